//! The processes of this machine, as `/proc/*/stat` lists them.

/// One process: its pid, command name and parent's pid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub pid: i32,
    pub comm: String,
    pub ppid: i32,
}

/// Every process that `/proc` shows and whose `stat` reads and parses;
/// none if `/proc` cannot be read.
pub fn processes() -> Vec<Process> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((comm, ppid)) = parse_stat(&stat) {
            found.push(Process {
                pid,
                comm: comm.to_string(),
                ppid,
            });
        }
    }
    found
}

/// "pid (comm) state ppid ...": comm may hold spaces and parens, so it
/// ends at the last ')'.
fn parse_stat(stat: &str) -> Option<(&str, i32)> {
    let (head, rest) = stat.rsplit_once(')')?;
    let comm = head.split_once('(').map(|(_, c)| c).unwrap_or("");
    let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
    Some((comm, ppid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_whatever_the_command_name() {
        assert_eq!(parse_stat("42 (ssh) S 7 42 42 0"), Some(("ssh", 7)));
        assert_eq!(parse_stat("42 (a b) c)) R 9 1"), Some(("a b) c)", 9)));
        assert_eq!(parse_stat("42 (ssh) S"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_listed_with_its_parent() {
        let me = std::process::id() as i32;
        let listed = processes();
        let mine = listed.iter().find(|p| p.pid == me).expect("this process");
        assert_eq!(mine.ppid, std::os::unix::process::parent_id() as i32);
    }
}
