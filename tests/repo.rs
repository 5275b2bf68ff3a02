//! The repository commands as a user runs them: `save -m` provenance shown by
//! `list` and logged by `load` (real sshd nodes), `alias`, `resolve`,
//! `share`, `rm`, `prune`, on real files in the rig's repository.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{Rig, assert_same, imaging, lines, output_text, summary, write_8mib_image};

const MIB: usize = 1 << 20;

/// A config layer: 1 MiB chunks, plus `extra`.
fn layer(rig: &Rig, extra: &str) -> PathBuf {
    let path = rig.dir().join("repo.conf");
    fs::write(&path, format!("[load]\nchunk_size = 1048576\n{extra}\n")).unwrap();
    path
}

fn images(rig: &Rig) -> PathBuf {
    rig.dir().join("images")
}

fn run(rig: &Rig, cfg: &Path, args: &[&str]) -> Output {
    imaging(rig, cfg).args(args).output().unwrap()
}

/// `list --json` rows by name.
fn list(rig: &Rig, cfg: &Path) -> Vec<serde_json::Value> {
    let out = run(rig, cfg, &["list", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    lines(&out)
}

fn row<'a>(rows: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("{name} not listed: {rows:?}"))
}

/// The one save in the repository whose name ends with `suffix`.
fn saved_as(rig: &Rig, suffix: &str) -> String {
    let found: Vec<String> = entries(&images(rig))
        .into_iter()
        .filter(|n| n.starts_with("saving__node01__") && n.ends_with(suffix))
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].clone()
}

/// Entries of a directory, hidden ones included.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn save_records_comment_node_and_held_image_which_list_shows_and_load_logs() {
    let rig = Rig::new(1);
    let cfg = layer(&rig, "");
    let base = write_8mib_image(&images(&rig).join("base.img"), 1);

    // The node holds base.img, then changes (as a node one saves does).
    let out = run(&rig, &cfg, &["load", "--json", "-i", "base", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    assert_same(&rig.nodes()[0].target, &base);
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .write(true)
            .open(&rig.nodes()[0].target)
            .unwrap();
        f.write_all_at(b"nginx installed", 4 * MIB as u64).unwrap();
    }
    let on_node = fs::read(&rig.nodes()[0].target).unwrap();

    let out = run(
        &rig,
        &cfg,
        &["save", "--json", "1", "-o", "gold", "-m", "with nginx"],
    );
    assert_eq!(summary(&out)["ok"], true, "{}", output_text(&out));
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    let saved = saved_as(&rig, "__gold.img");
    assert_same(&images(&rig).join(&saved), &on_node);
    assert!(
        images(&rig).join(format!(".{saved}.info")).is_file(),
        "{:?}",
        entries(&images(&rig))
    );

    let base_id = {
        let out = run(&rig, &cfg, &["resolve", "--json", "base"]);
        assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
        lines(&out)[0]["identity"].as_str().unwrap().to_string()
    };
    let rows = list(&rig, &cfg);
    let p = &row(&rows, &saved)["provenance"];
    assert_eq!(p["comment"], "with nginx", "{p}");
    assert_eq!(p["node"], "node01");
    assert_eq!(p["target"], rig.nodes()[0].target.to_str().unwrap());
    assert_eq!(p["held"]["image"], "base.img", "{p}");
    assert_eq!(p["held"]["identity"], base_id.as_str());
    assert!(!p["user"].as_str().unwrap().is_empty() && !p["host"].as_str().unwrap().is_empty());
    assert_eq!(p["size"], 8 * MIB as u64);
    // base.img was never saved: no provenance.
    assert!(row(&rows, "base.img")["provenance"].is_null());

    // list -l: the provenance under the image's row.
    let out = run(&rig, &cfg, &["list", "-l"]);
    let long = String::from_utf8_lossy(&out.stdout).into_owned();
    let under = long
        .lines()
        .skip_while(|l| !l.starts_with(&saved))
        .nth(1)
        .unwrap_or_default();
    assert!(
        under.trim_start().starts_with("saved from node01 on ")
            && under.contains(", held base.img, comment: with nginx"),
        "{long}"
    );

    // Loading the saved image logs where it came from, once.
    let out = run(&rig, &cfg, &["load", "--json", "-i", &saved, "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    let logged: Vec<String> = lines(&out)
        .iter()
        .filter(|l| l["event"] == "log")
        .filter_map(|l| l["text"].as_str().map(str::to_string))
        .filter(|t| t.starts_with(&format!("image {saved}: saved from node01 on ")))
        .collect();
    assert_eq!(logged.len(), 1, "{}", output_text(&out));
    assert!(
        logged[0].contains(" by ") && logged[0].ends_with(", held base.img, comment: with nginx"),
        "{}",
        logged[0]
    );
    // And the node's stamp now names the saved image: a second save says so.
    let out = run(&rig, &cfg, &["save", "--json", "1", "-o", "again"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    let again = saved_as(&rig, "__again.img");
    let rows = list(&rig, &cfg);
    let p = &row(&rows, &again)["provenance"];
    assert_eq!(p["held"]["image"], saved.as_str(), "{p}");
    assert!(p["comment"].is_null());
}

#[test]
fn alias_resolve_and_broken_aliases() {
    let rig = Rig::new_stopped(1);
    let cfg = layer(&rig, "");
    let repo = images(&rig);
    let data = write_8mib_image(&repo.join("ubuntu.img"), 2);
    write_8mib_image(&repo.join("fedora.img"), 3);

    let out = run(&rig, &cfg, &["alias", "gold", "ubuntu"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    assert_eq!(
        fs::read_link(repo.join("gold.img")).unwrap(),
        Path::new("ubuntu.img")
    );

    // resolve: the file -i gold loads, its size and identity.
    let out = run(&rig, &cfg, &["resolve", "gold"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    let file = fs::canonicalize(repo.join("ubuntu.img")).unwrap();
    assert_eq!(
        shown.lines().next(),
        Some(file.to_str().unwrap()),
        "{shown}"
    );
    assert!(shown.contains("8.0 MiB (8388608 bytes)"), "{shown}");
    assert!(shown.contains("alias to ubuntu.img, local"), "{shown}");
    let out = run(&rig, &cfg, &["resolve", "--json", "gold"]);
    let r = &lines(&out)[0];
    let out = run(&rig, &cfg, &["resolve", "--json", "ubuntu.img"]);
    let direct = &lines(&out)[0];
    assert_eq!(r["identity"], direct["identity"]);
    assert_eq!(r["identity"].as_str().unwrap().len(), 32);
    assert_eq!(r["size"], data.len() as u64);
    assert_eq!(r["file"], file.to_str().unwrap());

    // Refusals: an alias never replaces an image; an alias moves only with -f.
    let out = run(&rig, &cfg, &["alias", "fedora", "ubuntu"]);
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("never replaces an image"),
        "{}",
        output_text(&out)
    );
    assert!(
        fs::symlink_metadata(repo.join("fedora.img"))
            .unwrap()
            .is_file()
    );
    let out = run(&rig, &cfg, &["alias", "gold", "fedora"]);
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(output_text(&out).contains("-f"), "{}", output_text(&out));
    assert_eq!(
        fs::read_link(repo.join("gold.img")).unwrap(),
        Path::new("ubuntu.img")
    );
    let out = run(&rig, &cfg, &["alias", "-f", "gold", "fedora"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    assert_eq!(
        fs::read_link(repo.join("gold.img")).unwrap(),
        Path::new("fedora.img")
    );

    // list: each image's aliases; a broken alias, as broken.
    symlink("gone.img", repo.join("old.img")).unwrap();
    let rows = list(&rig, &cfg);
    assert_eq!(
        row(&rows, "fedora.img")["symlinks"],
        serde_json::json!(["gold.img"])
    );
    assert_eq!(row(&rows, "old.img")["broken"], true);
    assert_eq!(row(&rows, "old.img")["link_to"], "gone.img");
    assert_eq!(row(&rows, "gold.img")["broken"], false);
    let out = run(&rig, &cfg, &["list"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let old = table.lines().find(|l| l.starts_with("old.img")).unwrap();
    assert!(old.ends_with("-> gone.img (broken)"), "{table}");
    let fedora = table.lines().find(|l| l.starts_with("fedora.img")).unwrap();
    assert!(fedora.ends_with("local  <- gold.img"), "{table}");

    // load -i of a broken alias: said so, exit 2, the node untouched.
    let out = run(&rig, &cfg, &["load", "-i", "old", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("old.img is a broken alias to gone.img"),
        "{}",
        output_text(&out)
    );
    assert!(!rig.nodes()[0].target.exists());
    let out = run(&rig, &cfg, &["resolve", "old"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        output_text(&out).contains("broken alias"),
        "{}",
        output_text(&out)
    );
}

#[test]
fn share_moves_into_the_shared_repository_and_list_says_where() {
    let rig = Rig::new_stopped(1);
    let shared = rig.dir().join("shared");
    fs::create_dir(&shared).unwrap();
    let cfg = layer(
        &rig,
        &format!("[repository]\nshared = [{:?}]\n", shared.to_str().unwrap()),
    );
    let repo = images(&rig);
    let data = write_8mib_image(&repo.join("gold.img"), 4);
    symlink("gold.img", repo.join("default.img")).unwrap();
    // A manifest and a provenance sidecar travel with it.
    let out = run(&rig, &cfg, &["resolve", "gold"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    fs::write(repo.join(".gold.img.info"), b"{\"note\":\"kept\"}").unwrap();
    assert!(repo.join(".gold.img.manifest").is_file());

    let out = run(&rig, &cfg, &["share", "gold", "--as", "golden"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    assert_eq!(
        entries(&shared),
        [
            ".gold.img.info",
            ".gold.img.manifest",
            "gold.img",
            "golden.img"
        ],
        "{}",
        output_text(&out)
    );
    assert_same(&shared.join("gold.img"), &data);
    assert_eq!(entries(&repo), ["default.img"]);
    assert_eq!(
        fs::read_link(repo.join("default.img")).unwrap(),
        shared.join("gold.img")
    );
    assert_eq!(
        fs::read_link(shared.join("golden.img")).unwrap(),
        Path::new("gold.img")
    );
    let rows = list(&rig, &cfg);
    assert_eq!(row(&rows, "gold.img")["location"], "shared:1");
    assert_eq!(row(&rows, "gold.img")["manifest"], "fresh");
    assert_eq!(row(&rows, "default.img")["location"], "local");
    let mut aliases = row(&rows, "gold.img")["symlinks"].clone();
    aliases
        .as_array_mut()
        .unwrap()
        .sort_by_key(|v| v.to_string());
    assert_eq!(
        aliases,
        serde_json::json!(["default.img (local)", "golden.img"])
    );
    let out = run(&rig, &cfg, &["list"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(table.lines().next().unwrap().contains("WHERE"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("gold.img") && l.contains("shared:1")),
        "{table}"
    );
    // -i finds it in the shared repository, by name and through the aliases.
    for name in ["gold", "golden", "default"] {
        let out = run(&rig, &cfg, &["resolve", "--json", name]);
        assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
        let r = &lines(&out)[0];
        assert_eq!(
            r["file"],
            fs::canonicalize(shared.join("gold.img"))
                .unwrap()
                .to_str()
                .unwrap()
        );
    }

    // Sharing onto an existing name: refused, nothing moved.
    let second = write_8mib_image(&repo.join("gold.img"), 5);
    let out = run(&rig, &cfg, &["share", "gold.img"]);
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("already exists"),
        "{}",
        output_text(&out)
    );
    assert_same(&repo.join("gold.img"), &second);
    assert_same(&shared.join("gold.img"), &data);
    // Without a shared repository configured: refused.
    let plain = layer(&rig, "");
    let out = run(&rig, &plain, &["share", "gold"]);
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("no shared repository"),
        "{}",
        output_text(&out)
    );
}

#[test]
fn rm_removes_images_with_sidecars_and_refuses_aliased_ones() {
    let rig = Rig::new_stopped(1);
    let cfg = layer(&rig, "");
    let repo = images(&rig);
    write_8mib_image(&repo.join("a.img"), 6);
    write_8mib_image(&repo.join("b.img"), 7);
    for image in ["a", "b"] {
        let out = run(&rig, &cfg, &["resolve", image]);
        assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    }
    fs::write(repo.join(".a.img.info"), b"{}").unwrap();
    symlink("b.img", repo.join("keep.img")).unwrap();

    // b is aliased: refused, and a (named first) is untouched too.
    let before = entries(&repo);
    let out = run(&rig, &cfg, &["rm", "a", "b"]);
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("b.img is aliased by keep.img"),
        "{}",
        output_text(&out)
    );
    assert_eq!(entries(&repo), before);

    let out = run(&rig, &cfg, &["rm", "-n", "a"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains("would remove a.img (8.0 MiB on disk)"),
        "{said}"
    );
    assert!(said.contains("would free 8.0 MiB"), "{said}");
    assert_eq!(entries(&repo), before);

    let out = run(&rig, &cfg, &["rm", "a"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains("removed a.img"), "{said}");
    assert!(said.contains("removed 1 entry, freed 8.0 MiB"), "{said}");
    assert_eq!(entries(&repo), [".b.img.manifest", "b.img", "keep.img"]);

    // -f removes an aliased image; the alias is then listed as broken.
    let out = run(&rig, &cfg, &["rm", "-f", "b"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    assert_eq!(entries(&repo), ["keep.img"]);
    assert_eq!(row(&list(&rig, &cfg), "keep.img")["broken"], true);
    // An alias itself is removed as a link.
    let out = run(&rig, &cfg, &["rm", "keep"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed alias keep.img"));
    assert!(entries(&repo).is_empty());
    let out = run(&rig, &cfg, &["rm", "nothing"]);
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
}

#[test]
fn prune_keeps_the_newest_saves_of_each_node_and_name() {
    let rig = Rig::new_stopped(1);
    let cfg = layer(&rig, "");
    let repo = images(&rig);
    let saves = [
        "saving__fit01__2026-11-20@10-00__gold.img",
        "saving__fit01__2026-11-21@10-00__gold.img",
        "saving__fit01__2026-11-22@10-00__gold.img",
        "saving__fit02__2026-11-20@10-00__gold.img",
        "saving__fit01__2026-11-20@09-00.img",
        "saving__fit01__2026-11-23@09-00.img",
    ];
    for (k, s) in saves.iter().enumerate() {
        write_8mib_image(&repo.join(s), 10 + k as u64);
        fs::write(repo.join(format!(".{s}.info")), b"{}").unwrap();
    }
    write_8mib_image(&repo.join("ubuntu.img"), 20);
    symlink(saves[0], repo.join("first.img")).unwrap();

    let before = entries(&repo);
    let out = run(&rig, &cfg, &["prune", "-n", "--keep", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains(&format!("would remove {}", saves[1])),
        "{said}"
    );
    assert!(
        said.contains(&format!("would remove {}", saves[4])),
        "{said}"
    );
    assert!(
        said.contains(&format!("kept {}: aliased by first.img", saves[0])),
        "{said}"
    );
    assert!(
        said.contains("would remove 2 entries, would free 16 MiB"),
        "{said}"
    );
    assert_eq!(entries(&repo), before);

    let out = run(&rig, &cfg, &["prune", "--keep", "1", "*__gold.img"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains("removed 1 entry, freed 8.0 MiB"), "{said}");
    assert!(!repo.join(saves[1]).exists());
    assert!(!repo.join(format!(".{}.info", saves[1])).exists());
    for kept in [
        saves[0],
        saves[2],
        saves[3],
        saves[4],
        saves[5],
        "ubuntu.img",
    ] {
        assert!(repo.join(kept).exists(), "{kept}");
    }

    let out = run(&rig, &cfg, &["prune", "--keep", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    assert!(!repo.join(saves[4]).exists());
    assert!(repo.join(saves[5]).exists());
    let out = run(&rig, &cfg, &["prune", "--keep", "x"]);
    assert_eq!(out.status.code(), Some(2));
}
