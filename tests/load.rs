//! `imaging load`, `save` and `list` against real sshd nodes on 127.0.0.1.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Rig, assert_same, closed_port, imaging, node, summary, wait_for_data};

const MIB: usize = 1 << 20;

/// 64 MiB: random regions and zero regions (and a partial last chunk of data).
fn write_image(path: &Path) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(42);
    let mut data = vec![0u8; 64 * MIB];
    for (start, len) in [
        (0, 10 * MIB),
        (20 * MIB, 5 * MIB + 4096),
        (40 * MIB + 77, 3 * MIB),
        (60 * MIB, 4 * MIB),
    ] {
        rng.fill(&mut data[start..start + len]);
    }
    std::fs::write(path, &data).unwrap();
    data
}

/// Layer with 1 MiB chunks (64 chunks), plus `extra`.
fn layer(rig: &Rig, name: &str, extra: &str) -> PathBuf {
    let path = rig.dir().join(name);
    std::fs::write(&path, format!("[load]\nchunk_size = 1048576\n{extra}\n")).unwrap();
    path
}

#[test]
fn load_writes_identical_targets_then_recognises_them_and_sends_only_changes() {
    let rig = Rig::new(4);
    let image = write_image(&rig.dir().join("images/lab.img"));
    let cfg = layer(&rig, "l.conf", "");

    let out = imaging(&rig, &cfg)
        .args(["load", "--json", "-i", "lab.img", "1-4"])
        .output()
        .unwrap();
    let s = summary(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{s}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for n in rig.nodes() {
        assert_same(&n.target, &image);
        let ns = node(&s, &n.name);
        assert_eq!(ns["state"], "done");
        // 22 MiB of data in 23 chunks of 1 MiB; the zero regions are never sent.
        let sent = ns["bytes_sent"].as_u64().unwrap();
        assert!(
            sent <= 24 * MIB as u64 && sent >= 22 * MIB as u64,
            "sent {sent}: {}",
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains("\"log\""))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(ns["bytes_written"].as_u64().unwrap() >= 22 * MIB as u64);
    }

    // Again: every node is up to date, nothing is sent.
    let started = Instant::now();
    let out = imaging(&rig, &cfg)
        .args(["load", "--json", "-i", "lab.img", "1-4"])
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(0), "{s}");
    for n in rig.nodes() {
        assert_eq!(node(&s, &n.name)["state"], "up-to-date", "{s}");
        assert_eq!(node(&s, &n.name)["bytes_sent"], 0);
    }
    eprintln!("reload of 4 up-to-date nodes: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(8), "{elapsed:?}");

    // Three chunks overwritten on one node: only those are sent.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&rig.nodes()[2].target)
            .unwrap();
        for chunk in [1u64, 30, 62] {
            f.write_all_at(&[0xAB; 100], chunk * MIB as u64 + 5)
                .unwrap();
        }
    }
    let out = imaging(&rig, &cfg)
        .args(["load", "--json", "-i", "lab.img", "1-4"])
        .output()
        .unwrap();
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(0), "{s}");
    assert_eq!(node(&s, "node03")["state"], "done");
    // Chunks 1 and 62 hold data; chunk 30 is a zero chunk, restored on the
    // node without sending. Of chunks 1 and 62 only the 16 KiB block that
    // changed travels (block-level delta).
    assert_eq!(node(&s, "node03")["bytes_sent"], 2 * 16 * 1024, "{s}");
    assert_eq!(
        node(&s, "node03")["bytes_written"],
        MIB as u64 + 2 * 16 * 1024,
        "{s}"
    );
    for other in ["node01", "node02", "node04"] {
        assert_eq!(node(&s, other)["state"], "up-to-date");
    }
    assert_same(&rig.nodes()[2].target, &image);
}

#[test]
fn hooks_run_once_per_node_on_success_and_failure() {
    let rig = Rig::new(3);
    let image = write_image(&rig.dir().join("images/lab.img"));
    let log = rig.dir().join("hooks.log");
    let dead = closed_port();
    // node01, node02 load; bad03's target cannot be created (the agent
    // refuses it: failed); dead04 never answers (timeout at the deadline).
    let cfg = layer(
        &rig,
        "h.conf",
        &format!(
            "before = \"echo before {{name}} >> {0}\"\nafter = \"echo after {{name}} {{image}} >> {0}\"\nreconnect_wait = 1\n\
             [[node]]\nname = \"node01\"\naddress = \"127.0.0.1\"\nport = {1}\n\
             [[node]]\nname = \"node02\"\naddress = \"127.0.0.1\"\nport = {2}\n\
             [[node]]\nname = \"bad03\"\naddress = \"127.0.0.1\"\nport = {3}\ntarget = \"{4}/missing-dir/t.img\"\n\
             [[node]]\nname = \"dead04\"\naddress = \"127.0.0.1\"\nport = {dead}\n",
            log.display(),
            rig.nodes()[0].port,
            rig.nodes()[1].port,
            rig.nodes()[2].port,
            rig.dir().display(),
        ),
    );
    // The deadline is what ends dead04; it is generous so that the others
    // finish on a busy machine.
    let out = imaging(&rig, &cfg)
        .args([
            "load", "--json", "--fanout", "star", "-t", "40", "-i", "lab.img", "1-4",
        ])
        .output()
        .unwrap();
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(1), "{s}");
    assert_eq!(node(&s, "node01")["state"], "done", "{s}");
    assert_eq!(node(&s, "node02")["state"], "done", "{s}");
    assert_eq!(node(&s, "bad03")["state"], "failed", "{s}");
    assert!(
        node(&s, "bad03")["error"]
            .as_str()
            .unwrap_or("")
            .contains("missing-dir"),
        "{s}"
    );
    assert_eq!(node(&s, "dead04")["state"], "timeout", "{s}");
    assert_same(&rig.nodes()[0].target, &image);
    let text = std::fs::read_to_string(&log).unwrap();
    for name in ["node01", "node02", "bad03", "dead04"] {
        assert_eq!(
            text.matches(&format!("before {name}\n")).count(),
            1,
            "{text}"
        );
        assert_eq!(
            text.matches(&format!("after {name} lab.img\n")).count(),
            1,
            "{text}"
        );
    }
}

#[test]
fn sigint_cancels_runs_after_hooks_and_exits_130() {
    let rig = Rig::new(3);
    write_image(&rig.dir().join("images/lab.img"));
    let log = rig.dir().join("hooks.log");
    let cfg = layer(
        &rig,
        "s.conf",
        &format!(
            "before = \"echo before {{name}} >> {0}\"\nafter = \"echo after {{name}} >> {0}\"\n",
            log.display()
        ),
    );
    let child = imaging(&rig, &cfg)
        .args(["load", "--json", "-b", "4M", "-i", "lab.img", "1-3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = summary(&out);
    for n in rig.nodes() {
        assert_eq!(node(&s, &n.name)["state"], "cancelled", "{s}");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    for n in rig.nodes() {
        assert_eq!(
            text.matches(&format!("before {}\n", n.name)).count(),
            1,
            "{text}"
        );
        assert_eq!(
            text.matches(&format!("after {}\n", n.name)).count(),
            1,
            "{text}"
        );
    }
}

#[test]
fn killed_sshd_resumes_when_restarted_and_fails_when_left_dead() {
    let mut rig = Rig::new(3);
    let image = write_image(&rig.dir().join("images/lab.img"));
    // 5 MiB/s over all nodes: 3 x 22 MiB takes about 13 s.
    let cfg = layer(&rig, "r.conf", "retries = 3\nreconnect_wait = 15\n");
    let child = imaging(&rig, &cfg)
        .args([
            "load", "--json", "-t", "120", "-b", "5M", "-i", "lab.img", "1-3",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_data(&rig.nodes()[1].target);
    std::thread::sleep(Duration::from_secs(1));
    rig.kill(1);
    std::thread::sleep(Duration::from_secs(1));
    rig.start(1);
    let out = child.wait_with_output().unwrap();
    let s = summary(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{s}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for n in rig.nodes() {
        assert_same(&n.target, &image);
    }
    let sent = node(&s, "node02")["bytes_sent"].as_u64().unwrap();
    assert!(
        sent < 33 * MIB as u64,
        "node02 sent {sent} bytes for 22 MiB of data"
    );

    // Left dead: that node fails with a reason, the others finish.
    for n in rig.nodes() {
        std::fs::remove_file(&n.target).unwrap();
    }
    let cfg = layer(&rig, "d.conf", "retries = 1\nreconnect_wait = 2\n");
    let child = imaging(&rig, &cfg)
        .args([
            "load", "--json", "-t", "90", "-b", "5M", "-i", "lab.img", "1-3",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill node02 once data is landing there (its first connection is up).
    wait_for_data(&rig.nodes()[1].target);
    rig.kill(1);
    let out = child.wait_with_output().unwrap();
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(1), "{s}");
    assert_eq!(node(&s, "node01")["state"], "done");
    assert_eq!(node(&s, "node03")["state"], "done");
    assert_eq!(node(&s, "node02")["state"], "failed");
    let reason = node(&s, "node02")["error"].as_str().unwrap();
    assert!(
        reason.contains("did not come back") || reason.contains("connection"),
        "{reason}"
    );
    assert_same(&rig.nodes()[0].target, &image);
    assert_same(&rig.nodes()[2].target, &image);
}

#[test]
fn save_gives_an_identical_image_and_list_shows_it() {
    let rig = Rig::new(2);
    let image = write_image(&rig.nodes()[0].target);
    let cfg = layer(&rig, "v.conf", "");
    let out = imaging(&rig, &cfg)
        .args(["save", "--json", "1", "-o", "golden"])
        .output()
        .unwrap();
    let s = summary(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{s}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let saved: Vec<_> = std::fs::read_dir(rig.dir().join("images"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(saved.len(), 1, "{saved:?}");
    let name = &saved[0];
    assert!(
        name.starts_with("saving__node01__") && name.ends_with("__golden.img"),
        "{name}"
    );
    assert_same(&rig.dir().join("images").join(name), &image);

    let out = imaging(&rig, &cfg)
        .args(["list", "--json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "{text}");
    assert_eq!(rows[0]["name"], name.as_str());
    assert_eq!(rows[0]["manifest"], "fresh");
    assert_eq!(rows[0]["size"], 64 * MIB as u64);

    // Saving a node whose target is missing fails cleanly, leaving nothing.
    let out = imaging(&rig, &cfg)
        .args(["save", "--json", "2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let all: Vec<_> = std::fs::read_dir(rig.dir().join("images"))
        .unwrap()
        .flatten()
        .collect();
    assert!(
        all.iter()
            .all(|e| !e.file_name().to_string_lossy().contains("node02")),
        "{all:?}"
    );
}

#[test]
fn killed_save_leaves_nothing_that_list_shows_as_an_image() {
    let rig = Rig::new(1);
    write_image(&rig.nodes()[0].target);
    let cfg = layer(&rig, "k.conf", "");
    let mut child = imaging(&rig, &cfg)
        .args(["save", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill as soon as the partial file exists.
    let images = rig.dir().join("images");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let partial = std::fs::read_dir(&images)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".partial"));
        if partial {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let out = rig.imaging().args(["list", "--json"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn agent_refuses_garbage_with_a_clear_error() {
    let bin = env!("CARGO_BIN_EXE_imaging");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "random bytes",
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        ),
        (
            "oversized frame length",
            vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3],
        ),
        ("truncated frame", vec![100, 0, 0, 0, 1, b'I', b'M']),
        ("empty input", vec![]),
    ];
    for (what, input) in cases {
        let mut child = Command::new(bin)
            .arg("agent")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            let _ = stdin.write_all(&input);
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            matches!(out.status.code(), Some(2 | 3)),
            "{what}: {:?} {err}",
            out.status
        );
        assert!(err.starts_with("imaging agent:"), "{what}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
    }
}

#[test]
fn local_node_is_loaded_by_the_same_engine_without_ssh() {
    let rig = Rig::new(0);
    let image = write_image(&rig.dir().join("images/lab.img"));
    let target = rig.dir().join("targets/here.img");
    let cfg = layer(
        &rig,
        "local.conf",
        &format!(
            "[[node]]\nname = \"local01\"\nlocal = true\ntarget = \"{}\"\n",
            target.display()
        ),
    );
    let out = imaging(&rig, &cfg)
        .args(["load", "--json", "-i", "lab.img", "local01"])
        .output()
        .unwrap();
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(0), "{s}");
    assert_same(&target, &image);
    let out = imaging(&rig, &cfg)
        .args(["load", "--json", "-i", "lab.img", "1"])
        .output()
        .unwrap();
    assert_eq!(node(&summary(&out), "local01")["state"], "up-to-date");
}

#[test]
fn bad_image_and_missing_nodes_are_usage_errors() {
    let rig = Rig::new(1);
    write_image(&rig.dir().join("images/lab.img"));
    let out = rig
        .imaging()
        .args(["load", "-i", "lba.img", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("lba.img") && err.contains("lab.img"), "{err}");
    let out = rig
        .imaging()
        .args(["save", "1", "-o", "../escape"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("-o"), "{err}");
    assert!(!rig.dir().join("escape.img").exists());
}

#[test]
fn chunks_half_data_half_zeros_take_half_the_space_on_file_targets() {
    // Default chunk size: the zero blocks are inside chunks, not whole chunks.
    let rig = Rig::new(2);
    let mut rng = fastrand::Rng::with_seed(7);
    let mut image = vec![0u8; 32 * MIB];
    for block in image.chunks_mut(8192) {
        rng.fill(&mut block[..4096]);
    }
    std::fs::write(rig.dir().join("images/half.img"), &image).unwrap();
    // The old targets are full of data where the image has zeros.
    for n in rig.nodes() {
        std::fs::write(&n.target, vec![0xa5u8; 32 * MIB]).unwrap();
    }
    let cfg = rig.dir().join("defaults.conf");
    std::fs::write(&cfg, "").unwrap();

    let out = imaging(&rig, &cfg)
        .args(["load", "--json", "-i", "half.img", "1-2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", summary(&out));
    for n in rig.nodes() {
        assert_same(&n.target, &image);
        let used =
            std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&n.target).unwrap()) * 512;
        assert!(
            used <= 17 * MIB as u64,
            "{}: {used} bytes on disk for 16 MiB of data",
            n.name
        );
    }
}

/// What a load negotiates, as the node's sshd logs it: with the default
/// `[ssh] ciphers = "auto"` on a CPU with AES instructions, AES-GCM (ssh's
/// own first choice is chacha20-poly1305, which costs both ends more CPU);
/// with `ciphers = "ssh"`, ssh's own choice. A node whose sshd allows only
/// chacha20-poly1305 is still loaded: nothing is taken out of ssh's list.
#[test]
fn a_load_offers_aes_gcm_first_and_a_node_without_it_still_loads() {
    let mut rig = Rig::new(1);
    let image = common::write_8mib_image(&rig.dir().join("images/small.img"), 5);
    let lab_config = std::fs::read_to_string(rig.nodes()[0].sshd_config()).unwrap();
    // sshd keeps the first value of a keyword: these lines go before the lab's.
    let restart = |rig: &mut Rig, first: &str| {
        let path = rig.nodes()[0].sshd_config().to_path_buf();
        std::fs::write(&path, format!("LogLevel DEBUG1\n{first}{lab_config}")).unwrap();
        rig.kill(0);
        rig.start(0);
    };
    let load = |rig: &Rig, extra: &str| -> String {
        let target = &rig.nodes()[0].target;
        let _ = std::fs::remove_file(target);
        let offset = rig.nodes()[0].log().len();
        let cfg = rig.dir().join("ciphers.conf");
        std::fs::write(&cfg, extra).unwrap();
        let out = imaging(rig, &cfg)
            .args(["load", "--json", "-i", "small.img", "1"])
            .output()
            .unwrap();
        common::assert_success(&out);
        assert_same(target, &image);
        let log = rig.nodes()[0].log();
        let kex = "kex: client->server cipher: ";
        let line = log[offset..]
            .lines()
            .find(|l| l.contains(kex))
            .unwrap_or_else(|| panic!("no `{kex}` line in the sshd log:\n{log}"));
        let after = &line[line.find(kex).unwrap() + kex.len()..];
        after.split_whitespace().next().unwrap().to_string()
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let flags: Vec<&str> = cpu
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    let has_aes = flags.contains(&"aes") && flags.contains(&"pclmulqdq");
    let ssh_first = {
        let out = Command::new("ssh")
            .args(["-G", "-F", "/dev/null", "probe"])
            .output()
            .unwrap();
        let dump = String::from_utf8(out.stdout).unwrap();
        let list = imaging::node::ciphers::ciphers_line(&dump).unwrap();
        list.split(',').next().unwrap().to_string()
    };

    restart(&mut rig, "");
    let expected = if has_aes && ssh_first.contains("chacha") {
        "aes128-gcm@openssh.com"
    } else {
        ssh_first.as_str()
    };
    assert_eq!(load(&rig, ""), expected, "default [ssh] ciphers");
    assert_eq!(
        load(&rig, "[ssh]\nciphers = \"ssh\"\n"),
        ssh_first,
        "ciphers = \"ssh\""
    );

    restart(&mut rig, "Ciphers chacha20-poly1305@openssh.com\n");
    assert_eq!(load(&rig, ""), "chacha20-poly1305@openssh.com");
}

/// A run killed while it uploaded the agent (with a version that renamed
/// whatever had arrived into place) left a cut copy under the name every
/// later run of that binary starts: they all failed with "the agent did not
/// start". Now the cached copy that does not start is replaced, and the
/// node keeps an upload only when all of it arrived (the script is tested
/// in `node::agent_link`).
#[test]
fn a_cut_agent_left_in_the_nodes_cache_is_replaced() {
    let rig = Rig::new(1);
    let image = common::write_8mib_image(&rig.dir().join("images/small.img"), 9);
    // A copy of the binary with bytes of its own after the ELF data: it runs
    // the same, but its digest, and so its name in the node's cache, is its
    // own (the other tests' cached agent is left alone).
    let exe = rig.dir().join("bin").join("imaging");
    std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
    let mut bytes = std::fs::read(env!("CARGO_BIN_EXE_imaging")).unwrap();
    bytes.extend_from_slice(rig.dir().to_string_lossy().as_bytes());
    std::fs::write(&exe, &bytes).unwrap();
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let digest = format!("{:032x}", imaging::image::digest::chunk_digest(&bytes));
    // The rig's nodes log in as this user, into its home directory.
    // SAFETY: getpwuid of our own uid; the record is read at once.
    let home = unsafe {
        let pw = libc::getpwuid(libc::getuid());
        assert!(!pw.is_null());
        std::ffi::CStr::from_ptr((*pw).pw_dir)
            .to_string_lossy()
            .into_owned()
    };
    let cached = Path::new(&home)
        .join(".cache/imaging")
        .join(format!("agent-{}", &digest[..16]));
    std::fs::create_dir_all(cached.parent().unwrap()).unwrap();
    // Cut early, in the code (half a debug build, whose second half is
    // debug info, still runs).
    std::fs::write(&cached, &bytes[..256 << 10]).unwrap();
    std::fs::set_permissions(&cached, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();

    let cfg = rig.dir().join("defaults.conf");
    std::fs::write(&cfg, "").unwrap();
    let out = rig
        .imaging_at(&exe)
        .arg("--config")
        .arg(&cfg)
        .args(["load", "--json", "-i", "small.img", "1"])
        .output()
        .unwrap();
    let whole = std::fs::read(&cached).unwrap_or_default() == bytes;
    let _ = std::fs::remove_file(&cached);
    common::assert_success(&out);
    assert_same(&rig.nodes()[0].target, &image);
    assert!(whole, "the node's cached agent is not this binary");
}

/// A raw chunk goes from the image file into the node's pipe unread by the
/// controller (splice), so it is the node that finds an image changed after
/// its manifest was built; the error still names the image, and the chunk,
/// not the node.
#[test]
fn an_image_changed_behind_its_manifest_is_named_as_such() {
    let rig = Rig::new(1);
    let path = rig.dir().join("images/small.img");
    // Random throughout: no chunk compresses, each goes spliced.
    let mut image = vec![0u8; 8 * MIB];
    fastrand::Rng::with_seed(11).fill(&mut image);
    std::fs::write(&path, &image).unwrap();
    let cfg = rig.dir().join("defaults.conf");
    std::fs::write(&cfg, "").unwrap();
    let load = || {
        let _ = std::fs::remove_file(&rig.nodes()[0].target);
        imaging(&rig, &cfg)
            .args(["load", "--json", "-i", "small.img", "1"])
            .output()
            .unwrap()
    };
    let out = load();
    assert_eq!(out.status.code(), Some(0), "{}", summary(&out));
    assert_same(&rig.nodes()[0].target, &image);

    // One byte of the second chunk changes; the file keeps its
    // length and mtime, so the cached manifest is still taken as current.
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    image[(4 << 20) + 100] ^= 0xff;
    std::fs::write(&path, &image).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let out = load();
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(1), "{s}");
    let error = node(&s, "node01")["error"].as_str().unwrap().to_string();
    assert!(
        error.contains("the image changed while loading (chunk 1 no longer matches its manifest)"),
        "{error}"
    );
}
