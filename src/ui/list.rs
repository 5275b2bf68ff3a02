//! The `imaging list` table.

use crate::image::manifest::ManifestState;
use crate::image::repo::ImageInfo;
use crate::ui::fmt::human_bytes;

/// A table for humans: NAME FORMAT SIZE DATA DATE MANIFEST LINKS.
pub fn list_table(images: &[ImageInfo]) -> String {
    let header = [
        "NAME", "FORMAT", "SIZE", "DATA", "DATE", "MANIFEST", "LINKS",
    ];
    let rows: Vec<[String; 7]> = images
        .iter()
        .map(|i| {
            let links = match &i.link_to {
                Some(target) => format!("-> {target}"),
                None if i.symlinks.is_empty() => String::new(),
                None => format!("<- {}", i.symlinks.join(", ")),
            };
            let state = match i.manifest {
                ManifestState::Fresh => "fresh",
                ManifestState::Stale => "stale",
                ManifestState::Missing => "missing",
            };
            [
                i.name.clone(),
                i.format.clone(),
                human_bytes(i.size),
                human_bytes(i.data_size),
                i.modified.clone(),
                state.to_string(),
                links,
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 7]| {
        let mut s = String::new();
        for (k, (cell, w)) in cells.iter().zip(widths).enumerate() {
            match k {
                0 => s.push_str(&format!("{cell:<w$}")),
                2 | 3 => s.push_str(&format!("  {cell:>w$}")),
                6 => s.push_str(&format!("  {cell}")),
                _ => s.push_str(&format!("  {cell:<w$}")),
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(header);
    for row in &rows {
        out.push_str(&line(row.each_ref().map(String::as_str)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn image(name: &str, size: u64, data_size: u64) -> ImageInfo {
        ImageInfo {
            name: name.into(),
            path: PathBuf::from(name),
            format: "raw".into(),
            size,
            data_size,
            modified: "2026-01-02 03:04".into(),
            symlinks: vec![],
            manifest: ManifestState::Missing,
            link_to: None,
        }
    }

    #[test]
    fn table_has_one_row_per_image_with_human_sizes() {
        let mut ubuntu = image("ubuntu.img", 3 << 20, 1 << 20);
        ubuntu.symlinks = vec!["default.img".into(), "latest.img".into()];
        ubuntu.manifest = ManifestState::Fresh;
        let mut default = image("default.img", 3 << 20, 1 << 20);
        default.link_to = Some("ubuntu.img".into());
        let mut ndz = image("old.ndz", 5 << 20, 5 << 20);
        ndz.format = "ndz v3".into();
        let images = [image("sparse.img", 1 << 30, 0), ubuntu, default, ndz];
        let table = list_table(&images);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 1 + images.len());
        for col in [
            "NAME", "FORMAT", "SIZE", "DATA", "DATE", "MANIFEST", "LINKS",
        ] {
            assert!(lines[0].contains(col), "{}", lines[0]);
        }
        let sparse = lines.iter().find(|l| l.starts_with("sparse.img")).unwrap();
        assert!(
            sparse.contains("1.0 GiB") && sparse.contains("0 B") && sparse.contains("missing"),
            "{sparse}"
        );
        let ubuntu = lines.iter().find(|l| l.starts_with("ubuntu.img")).unwrap();
        assert!(ubuntu.contains("<- default.img, latest.img"), "{ubuntu}");
        assert!(ubuntu.contains("fresh"), "{ubuntu}");
        let default = lines.iter().find(|l| l.starts_with("default.img")).unwrap();
        assert!(default.ends_with("-> ubuntu.img"), "{default}");
        assert!(table.contains("ndz v3"));
        // Columns line up: every row's SIZE ends where the header's does.
        let end = lines[0].find("SIZE").unwrap() + 4;
        for l in &lines[1..] {
            assert_ne!(l.as_bytes()[end - 1], b' ', "{l}");
        }
        assert_eq!(list_table(&[]).lines().count(), 1);
    }
}
