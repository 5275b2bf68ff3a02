//! Configuration layering and errors, through the real binary.

mod common;

use common::Rig;

#[test]
fn layers_apply_in_order_and_config_shows_where_each_value_came_from() {
    let rig = Rig::new(0);
    let home = rig.dir().join("home");
    let xdg = rig.dir().join("xdg/config/imaging");
    std::fs::create_dir_all(&xdg).unwrap();
    std::fs::write(
        home.join(".imaging.conf"),
        "[ssh]\nport = 2201\n[wait]\ntimeout = 11\n[load]\nretries = 7\n",
    )
    .unwrap();
    std::fs::write(
        xdg.join("imaging.conf"),
        "[ssh]\nport = 2202\n[wait]\ntimeout = 22\n",
    )
    .unwrap();
    // The rig's own file is IMAGING_CONFIG; ./imaging.conf is another, in the working dir.
    let work = rig.dir().join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("imaging.conf"), "[ssh]\nport = 2203\n").unwrap();
    let out = rig
        .imaging()
        .current_dir(&work)
        .arg("config")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{key} ")))
            .unwrap_or_else(|| panic!("{key} missing in\n{text}"))
            .to_string()
    };
    // ./imaging.conf beats the user config dir, which beats ~/.imaging.conf …
    // Origins are full paths: ./imaging.conf is the one in the working dir.
    assert!(
        line("ssh.port").contains("= 2203")
            && line("ssh.port").ends_with(&format!("# {}", work.join("imaging.conf").display()))
    );
    assert!(
        line("wait.timeout").contains("= 22")
            && line("wait.timeout").contains("xdg/config/imaging/imaging.conf")
    );
    assert!(
        line("load.retries").contains("= 7") && line("load.retries").contains("home/.imaging.conf")
    );
    assert!(line("load.concurrency").ends_with("# built-in default"));
    // … and IMAGING_CONFIG (the rig's file) beats them all for the keys it sets.
    assert!(line("ssh.identity_file").contains("client_key"));
    assert!(line("ssh.known_hosts").contains("\"strict\""));

    // --config beats IMAGING_CONFIG.
    let top = rig.dir().join("top.conf");
    std::fs::write(&top, "[ssh]\nport = 2299\n").unwrap();
    let out = rig
        .imaging()
        .current_dir(&work)
        .arg("--config")
        .arg(&top)
        .arg("config")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let port = text.lines().find(|l| l.starts_with("ssh.port ")).unwrap();
    assert!(
        port.contains("= 2299") && port.contains("top.conf"),
        "{port}"
    );
}

#[test]
fn unknown_key_is_an_error_naming_file_line_and_key() {
    let rig = Rig::new(0);
    let work = rig.dir().join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(
        work.join("imaging.conf"),
        "# site\n[load]\nconcurrency = 4\ncompresion = 3\n",
    )
    .unwrap();
    let out = rig
        .imaging()
        .current_dir(&work)
        .args(["nodes", "-a"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("imaging.conf, line 4"), "{err}");
    assert!(err.contains("compresion"), "{err}");
}

#[test]
fn missing_explicit_config_is_an_error() {
    let rig = Rig::new(0);
    let out = rig
        .imaging()
        .args(["--config", "nowhere.conf", "config"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("nowhere.conf"), "{err}");
}

#[test]
fn r2lab_json_inventory_feeds_node_selection() {
    let rig = Rig::new(0);
    let inv = rig.dir().join("inventory.json");
    std::fs::write(
        &inv,
        r#"[{"control": {"hostname": "fit01", "ip": "192.168.3.1", "mac": "00:03:1d:0e:03:19"}, "cmc": {"hostname": "reboot01"}},
            {"control": {"hostname": "fit02", "ip": "192.168.3.2", "mac": "00:03:1d:0e:03:1a"}, "cmc": {"hostname": "reboot02"}},
            {"control": {"hostname": "fit03", "ip": "192.168.3.3", "mac": "00:03:1d:0e:03:1b"}, "cmc": {"hostname": "reboot03"}}]"#,
    )
    .unwrap();
    let cfg = rig.dir().join("r2lab.conf");
    std::fs::write(
        &cfg,
        format!("[nodes]\ninventory = \"{}\"\n", inv.display()),
    )
    .unwrap();
    let out = rig
        .imaging()
        .env("IMAGING_CONFIG", &cfg)
        .args(["nodes", "reboot1-3", "~2"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "fit01 fit03",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    std::fs::write(&inv, "[{\"control\": {\"hostname\": \"fit01\"}},]").unwrap();
    let out = rig
        .imaging()
        .env("IMAGING_CONFIG", &cfg)
        .args(["nodes", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains("inventory.json") && err.contains("trailing commas"),
        "{err}"
    );
}
