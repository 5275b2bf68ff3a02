//! Who runs this controller, for the lock record an agent leaves on the
//! target it holds: a second run onto the same target is told by whom.

/// `controller <host> pid <pid> (<command line>)`.
pub fn holder() -> String {
    let host = hostname().unwrap_or_else(|| "?".into());
    let command: Vec<String> = std::env::args().collect();
    format!(
        "controller {host} pid {} ({})",
        std::process::id(),
        command.join(" ")
    )
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_this_process() {
        let h = super::holder();
        assert!(h.starts_with("controller "), "{h}");
        assert!(h.contains(&format!("pid {}", std::process::id())), "{h}");
    }
}
