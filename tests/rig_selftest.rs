//! Proves the test rig with the plain `ssh` client, not the imaging binary.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{Rig, closed_port, die_with_test, silent_listener};

/// `ssh … -p PORT root@127.0.0.1 <remote>` against node `i`, trusting only
/// the rig's key and known_hosts.
fn ssh(rig: &Rig, i: usize, remote: &str) -> Command {
    let mut cmd = Command::new("ssh");
    cmd.arg("-F")
        .arg("none")
        .arg("-i")
        .arg(rig.client_key())
        .args(["-o", "BatchMode=yes"])
        .args(["-o", "StrictHostKeyChecking=yes"])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            rig.known_hosts().display()
        ))
        .args(["-o", "IdentitiesOnly=yes"])
        .args(["-o", "ConnectTimeout=5"])
        .arg("-p")
        .arg(rig.nodes()[i].port.to_string())
        .arg("root@127.0.0.1")
        .arg(remote)
        .stdin(Stdio::null());
    cmd
}

fn run(mut cmd: Command) -> Output {
    cmd.output().expect("run ssh")
}

fn assert_hello(rig: &Rig, i: usize) {
    let out = run(ssh(rig, i, "echo hello"));
    assert!(
        out.status.success(),
        "ssh to {} failed: {}\nsshd log:\n{}",
        rig.nodes()[i].name,
        String::from_utf8_lossy(&out.stderr),
        rig.nodes()[i].log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
}

fn assert_ssh_fails(rig: &Rig, i: usize) {
    let out = run(ssh(rig, i, "echo hello"));
    assert!(
        !out.status.success(),
        "ssh to stopped {} succeeded",
        rig.nodes()[i].name
    );
    assert!(out.stdout.is_empty());
}

fn wait_exit(child: &mut Child, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if child.try_wait().expect("try_wait").is_some() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Gone, or a zombie waiting for init to reap it.
fn process_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rfind(')')
            .and_then(|at| stat[at + 1..].split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

fn connect(port: u16) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(1),
    )
}

#[test]
fn three_nodes_answer_ssh_die_restart_and_clean_up() {
    let mut rig = Rig::new(3);
    let names: Vec<&str> = rig.nodes().iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["node01", "node02", "node03"]);
    for i in 0..3 {
        assert_hello(&rig, i);
    }

    // A session open on node02 must be cut when the node is killed, even
    // though sshd's connection child left the listener's process group.
    let mut session = ssh(&rig, 1, "echo $$; exec sleep 30");
    die_with_test(&mut session);
    let mut session = session
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn long ssh session");
    let mut first = String::new();
    BufReader::new(session.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("read remote pid");
    let remote_pid: u32 = first.trim().parse().expect("remote pid");

    let old_pid = rig.nodes()[1].pid().expect("node02 running");
    rig.kill(1);
    assert!(rig.nodes()[1].pid().is_none());
    assert!(process_dead(old_pid), "node02 sshd {old_pid} still alive");
    assert!(
        wait_exit(&mut session, Duration::from_secs(3)),
        "ssh session to killed node02 still open"
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    while !process_dead(remote_pid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        process_dead(remote_pid),
        "remote command {remote_pid} survived kill"
    );
    assert_ssh_fails(&rig, 1);
    assert_hello(&rig, 0);

    let port = rig.nodes()[1].port;
    rig.start(1);
    assert_eq!(rig.nodes()[1].port, port, "restart keeps the port");
    assert_hello(&rig, 1);

    let pids: Vec<u32> = rig.nodes().iter().map(|n| n.pid().unwrap()).collect();
    let dir = rig.dir().to_path_buf();
    drop(rig);
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "sshd {pid} alive after Rig drop"
        );
    }
    assert!(!dir.exists(), "rig dir left behind");
}

#[test]
fn stopped_nodes_start_on_their_reserved_ports() {
    let mut rig = Rig::new_stopped(2);
    assert!(rig.nodes().iter().all(|n| n.pid().is_none()));
    for node in rig.nodes() {
        let err = connect(node.port).expect_err("stopped node accepts TCP");
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    }
    rig.start(0);
    assert_hello(&rig, 0);
    assert_ssh_fails(&rig, 1);
    rig.start(1);
    assert_hello(&rig, 1);
    // start() on a running node restarts it.
    let before = rig.nodes()[0].pid();
    rig.start(0);
    assert_ne!(rig.nodes()[0].pid(), before);
    assert_hello(&rig, 0);
}

#[test]
fn start_retries_a_taken_port_then_panics_with_the_log() {
    let mut rig = Rig::new_stopped(1);
    let port = rig.nodes()[0].port;
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).expect("squat port");
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rig.start(0)));
    let msg = caught.expect_err("start on a taken port must panic");
    let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("stays taken"), "{msg}");
    assert!(msg.contains("Address already in use"), "{msg}");
    assert!(rig.nodes()[0].pid().is_none());
    drop(squatter);
    rig.start(0);
    assert_eq!(rig.nodes()[0].port, port);
    assert_hello(&rig, 0);
}

#[test]
fn config_lists_every_node_and_rig_paths() {
    let rig = Rig::new_stopped(3);
    rig.write_config("[extra]\nkey = 1\n");
    let text = std::fs::read_to_string(rig.config_path()).expect("read imaging.conf");
    let conf: toml::Table = toml::from_str(&text).expect("imaging.conf is TOML");
    let dir = rig.dir();
    let s = |v: &toml::Value| v.as_str().expect("string").to_owned();

    assert_eq!(s(&conf["ssh"]["user"]), "root");
    assert_eq!(s(&conf["ssh"]["known_hosts"]), "strict");
    assert_eq!(conf["ssh"]["connect_timeout"].as_integer(), Some(5));
    assert_eq!(
        Path::new(&s(&conf["ssh"]["identity_file"])),
        dir.join("client_key")
    );
    assert_eq!(
        Path::new(&s(&conf["ssh"]["known_hosts_file"])),
        dir.join("known_hosts")
    );
    assert_eq!(
        Path::new(&s(&conf["repository"]["dir"])),
        dir.join("images")
    );
    assert!(dir.join("images").is_dir() && dir.join("targets").is_dir());
    assert_eq!(
        Path::new(&s(&conf["load"]["target"])),
        dir.join("targets/{name}.img")
    );
    assert_eq!(s(&conf["nodes"]["all"]), "1-3");
    assert_eq!(conf["extra"]["key"].as_integer(), Some(1));

    let entries = conf["node"].as_array().expect("[[node]] array");
    assert_eq!(entries.len(), 3);
    let known_hosts = std::fs::read_to_string(rig.known_hosts()).unwrap();
    for (entry, node) in entries.iter().zip(rig.nodes()) {
        assert_eq!(s(&entry["name"]), node.name);
        assert_eq!(s(&entry["address"]), "127.0.0.1");
        assert_eq!(entry["port"].as_integer(), Some(i64::from(node.port)));
        assert_eq!(node.target, dir.join(format!("targets/{}.img", node.name)));
        let prefix = format!("[127.0.0.1]:{} ssh-ed25519 AAAA", node.port);
        assert!(
            known_hosts.lines().any(|l| l.starts_with(&prefix)),
            "no known_hosts line for {}",
            node.name
        );
    }
    let mut ports: Vec<u16> = rig.nodes().iter().map(|n| n.port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 3, "ports are distinct");

    let cmd = rig.imaging();
    assert_eq!(cmd.get_current_dir(), Some(dir));
    let envs: Vec<(String, Option<String>)> = cmd
        .get_envs()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.map(|v| v.to_string_lossy().into_owned()),
            )
        })
        .collect();
    let get = |key: &str| {
        envs.iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("{key} not set"))
            .1
            .clone()
    };
    assert_eq!(
        get("IMAGING_CONFIG").map(std::path::PathBuf::from),
        Some(rig.config_path())
    );
    assert_eq!(get("NODES"), None, "NODES is removed");
    assert_eq!(get("NO_COLOR").as_deref(), Some("1"));
    for key in [
        "HOME",
        "XDG_CONFIG_HOME",
        "XDG_STATE_HOME",
        "XDG_DATA_HOME",
        "XDG_CACHE_HOME",
        "XDG_RUNTIME_DIR",
    ] {
        let path = std::path::PathBuf::from(get(key).expect("set"));
        assert!(path.starts_with(dir) && path.is_dir(), "{key}={path:?}");
    }
}

#[test]
fn silent_listener_accepts_and_never_speaks() {
    let (port, guard) = silent_listener();
    assert_eq!(guard.port(), port);
    let mut stream = connect(port).expect("silent listener accepts");
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(n) => panic!("silent listener answered ({n} bytes)"),
        Err(e) => assert!(
            matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "unexpected read error {e}"
        ),
    }
    assert!(started.elapsed() >= Duration::from_millis(450));

    // Dropping the guard stops the thread promptly and closes connections.
    let started = Instant::now();
    drop(guard);
    assert!(started.elapsed() < Duration::from_secs(1));
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let closed = matches!(stream.read(&mut buf), Ok(0) | Err(_));
    assert!(closed, "held connection not closed after drop");
    assert!(
        connect(port).is_err(),
        "listener still accepting after drop"
    );
}

#[test]
fn closed_port_refuses() {
    let port = closed_port();
    let err = connect(port).expect_err("closed port accepted");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
}
