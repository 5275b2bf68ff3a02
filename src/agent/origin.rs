//! Where a load came from: the provenance a load's stamp records.

/// When and from where a load came: the stamp's provenance fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Origin {
    /// When the stamp was written, UTC, RFC 3339 with its zone
    /// (`2026-12-02T18:13:44Z`).
    pub(super) loaded_at: String,
    /// The controller's host name and user.
    pub(super) host: String,
    pub(super) user: String,
    /// The controller's build (`imaging 0.1.0`), from its Hello.
    pub(super) tool: String,
}
