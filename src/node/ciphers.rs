//! AES-GCM first among the ciphers ssh offers, when this machine's CPU has
//! AES instructions (`[ssh] ciphers = "auto"`, the default).
//!
//! On such a CPU, AES-GCM costs ssh and sshd far less than OpenSSH's default
//! first choice, chacha20-poly1305, and on a fast link or loopback a load is
//! bound by that CPU on both ends. Nothing is removed: ssh still offers its
//! whole default list, so a node without AES-GCM negotiates as before.
//!
//! The openssh crate passes no `-o` of ours, so the preference travels in an
//! ssh configuration file (`-F`) that first includes the user's and the
//! system's own files. ssh keeps the first value it reads for an option, so
//! a `Ciphers` line of the user's or the administrator's still wins, and
//! host aliases, `ProxyJump` and the rest keep working.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What ssh reads without `-F`, in its order: the user's file, then the
/// system's.
pub const OWN_CONFIGS: [&str; 2] = ["~/.ssh/config", "/etc/ssh/ssh_config"];

/// The file's name in the run's control directory.
const FILE_NAME: &str = "ssh_config";

/// `defaults` (a comma-separated cipher list) with its AES-GCM ciphers moved
/// first, in their order; None when it has none or starts with one already
/// (nothing to change).
pub fn gcm_first(defaults: &str) -> Option<String> {
    let names: Vec<&str> = defaults.split(',').map(str::trim).collect();
    let is_gcm = |n: &&str| n.starts_with("aes") && n.contains("-gcm");
    if names.first().is_none_or(is_gcm) || !names.iter().any(is_gcm) {
        return None;
    }
    let (gcm, rest): (Vec<&str>, Vec<&str>) = names.into_iter().partition(is_gcm);
    Some([gcm, rest].concat().join(","))
}

/// The `ciphers` line of `ssh -G` output.
pub fn ciphers_line(dump: &str) -> Option<&str> {
    dump.lines()
        .find_map(|l| l.strip_prefix("ciphers "))
        .map(str::trim)
}

/// ssh's own cipher list, as `ssh -G` prints it with no configuration
/// file; None if ssh cannot say.
fn ssh_defaults() -> Option<String> {
    let out = Command::new("ssh")
        .args(["-G", "-F", "/dev/null", "imaging-cipher-probe"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    ciphers_line(&String::from_utf8_lossy(&out.stdout)).map(str::to_string)
}

/// Does this CPU do AES and the carry-less multiply GCM needs in hardware?
fn cpu_has_aes() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// The configuration: `includes`, in order, then the cipher list for every
/// host.
pub fn config_text(includes: &[&str], ciphers: &str) -> String {
    let mut text = String::from(
        "# Written by imaging for one run: ssh's own files first (the first value\n\
         # read for an option wins), then imaging's cipher preference.\n",
    );
    for file in includes {
        text.push_str(&format!("Include {file}\n"));
    }
    text.push_str(&format!("Host *\n    Ciphers {ciphers}\n"));
    text
}

/// Write the configuration into `dir` (the run's private control
/// directory) when the preference applies here; its path, or None: the CPU
/// has no AES instructions, or ssh's own list has no AES-GCM or puts it
/// first already, or ssh could not be asked.
pub fn write_config(dir: &Path) -> std::io::Result<Option<PathBuf>> {
    if !cpu_has_aes() {
        return Ok(None);
    }
    let Some(list) = ssh_defaults().as_deref().and_then(gcm_first) else {
        return Ok(None);
    };
    let path = dir.join(FILE_NAME);
    std::fs::write(&path, config_text(&OWN_CONFIGS, &list))?;
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPENSSH_9: &str = "chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr,aes128-gcm@openssh.com,aes256-gcm@openssh.com";

    #[test]
    fn gcm_moves_first_and_nothing_is_dropped() {
        assert_eq!(
            gcm_first(OPENSSH_9).as_deref(),
            Some(
                "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr"
            )
        );
    }

    #[test]
    fn a_list_without_gcm_or_with_gcm_first_is_left_alone() {
        assert_eq!(gcm_first("chacha20-poly1305@openssh.com,aes128-ctr"), None);
        assert_eq!(
            gcm_first("aes256-gcm@openssh.com,aes128-ctr,aes128-gcm@openssh.com"),
            None
        );
        assert_eq!(gcm_first(""), None);
    }

    #[test]
    fn the_file_includes_the_users_then_the_systems_files_before_the_preference() {
        let text = config_text(&OWN_CONFIGS, "aes128-gcm@openssh.com,aes128-ctr");
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "Include ~/.ssh/config",
                "Include /etc/ssh/ssh_config",
                "Host *",
                "    Ciphers aes128-gcm@openssh.com,aes128-ctr",
            ]
        );
    }

    #[test]
    fn the_ciphers_line_is_found_in_ssh_g_output() {
        let dump = "user root\nhostname x\nciphers a,b\nmacs c\n";
        assert_eq!(ciphers_line(dump), Some("a,b"));
        assert_eq!(ciphers_line("user root\n"), None);
    }

    /// What real ssh makes of the file: with no Ciphers of the user's, it
    /// offers AES-GCM first; with one, the user's wins; a host alias and
    /// port of the user's still apply.
    #[test]
    fn real_ssh_reads_the_users_file_first_then_the_preference() {
        if Command::new("ssh").arg("-V").output().is_err() {
            eprintln!("skipped: no ssh client");
            return;
        }
        let Some(defaults) = ssh_defaults() else {
            panic!("ssh -G printed no ciphers line");
        };
        let Some(list) = gcm_first(&defaults) else {
            eprintln!("skipped: this ssh has no AES-GCM after another cipher ({defaults})");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let user = dir.path().join("user_config");
        let ours = dir.path().join("ssh_config");
        let effective = |host: &str| {
            let out = Command::new("ssh")
                .arg("-G")
                .arg("-F")
                .arg(&ours)
                .arg(host)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            assert!(out.status.success(), "ssh -G {host}: {out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        std::fs::write(
            &user,
            "Host lab-alias\n    HostName 127.0.0.9\n    Port 2222\n\
             Host pinned\n    Ciphers aes256-ctr\n",
        )
        .unwrap();
        let user_path = user.display().to_string();
        std::fs::write(&ours, config_text(&[&user_path], &list)).unwrap();

        let alias = effective("lab-alias");
        assert_eq!(ciphers_line(&alias), Some(list.as_str()));
        assert!(alias.contains("\nhostname 127.0.0.9\n"), "{alias}");
        assert!(alias.contains("\nport 2222\n"), "{alias}");
        assert_eq!(ciphers_line(&effective("pinned")), Some("aes256-ctr"));
        assert!(list.starts_with("aes"), "{list}");
    }
}
