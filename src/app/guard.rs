//! Checks of a load's image and targets before anything starts: an empty
//! image, and a target that is (or lies in) the image repository.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::app::exit::UsageError;
use crate::inventory::Node;

/// An empty image (`size` bytes: of the file, or of the disk it holds) is a
/// bad image: loading it would truncate every target.
pub(super) fn refuse_empty_image(image: &Path, size: u64) -> Result<(), UsageError> {
    if size == 0 {
        return Err(UsageError::Other(format!(
            "image {} is empty (0 bytes): not an image, nothing loaded",
            image.display()
        )));
    }
    Ok(())
}

/// For each node, whether its target is the image file itself (then it is
/// up to date without a session). A target elsewhere in the repository is
/// refused: loading would overwrite an image.
///
/// Only nodes that share the controller's filesystem are checked: local
/// agents and nodes at a loopback address (127.0.0.0/8, ::1, localhost),
/// whose agent runs on this machine. For any other SSH node a path names a
/// file on that node, which the controller cannot see; the same path there
/// is some other file, so checking it here would refuse loads wrongly.
pub(super) fn targets_in_repository(
    repo_dir: &Path,
    image: &Path,
    nodes: &[Node],
    targets: &[String],
) -> Result<Vec<bool>, UsageError> {
    let repo = std::fs::canonicalize(repo_dir).ok();
    let image = std::fs::canonicalize(image).ok();
    let mut is_image = Vec::with_capacity(nodes.len());
    for (node, target) in nodes.iter().zip(targets) {
        let here = if shares_filesystem(node) {
            resolve(Path::new(target))
        } else {
            None
        };
        let Some(here) = here else {
            is_image.push(false);
            continue;
        };
        if image.as_deref() == Some(here.as_path()) {
            is_image.push(true);
            continue;
        }
        if let Some(repo) = &repo
            && here.starts_with(repo)
        {
            return Err(UsageError::Other(format!(
                "{}: target {target} is {} in the image repository {}: refusing to overwrite an image",
                node.name,
                here.display(),
                repo.display()
            )));
        }
        is_image.push(false);
    }
    Ok(is_image)
}

fn shares_filesystem(node: &Node) -> bool {
    node.local
        || node.address.eq_ignore_ascii_case("localhost")
        || node
            .address
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The canonical path of `target`, or of its parent joined with its name
/// when it does not exist yet; None if neither resolves.
fn resolve(target: &Path) -> Option<PathBuf> {
    if let Ok(p) = std::fs::canonicalize(target) {
        return Some(p);
    }
    let name = target.file_name()?;
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Some(std::fs::canonicalize(parent).ok()?.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, address: &str) -> Node {
        Node {
            name: name.into(),
            address: address.into(),
            ..Node::default()
        }
    }

    #[test]
    fn loopback_targets_in_the_repository_are_refused_or_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("images");
        std::fs::create_dir(&repo).unwrap();
        let image = repo.join("a.img");
        std::fs::write(&image, b"a").unwrap();
        std::fs::write(repo.join("b.img"), b"b").unwrap();
        let outside = dir.path().join("disk.img").display().to_string();
        let nodes = [node("n1", "127.0.0.1"), node("n2", "localhost")];
        let t = |a: &Path, b: &str| vec![a.display().to_string(), b.to_string()];
        assert_eq!(
            targets_in_repository(&repo, &image, &nodes, &t(&image, &outside)).unwrap(),
            vec![true, false]
        );
        // Through a `..` the same file is still the image.
        let odd = repo.join("..").join("images").join("a.img");
        assert_eq!(
            targets_in_repository(&repo, &image, &nodes, &t(&odd, &outside)).unwrap(),
            vec![true, false]
        );
        let e = targets_in_repository(&repo, &image, &nodes, &t(&repo.join("b.img"), &outside))
            .unwrap_err()
            .to_string();
        assert!(e.contains("n1") && e.contains("b.img"), "{e}");
        // A file not there yet, in the repository, is refused too.
        assert!(
            targets_in_repository(&repo, &image, &nodes, &t(&repo.join("new.img"), &outside))
                .is_err()
        );
        // A remote node's path names a file on that node: not checked.
        let remote = [node("r1", "10.0.0.5")];
        assert_eq!(
            targets_in_repository(&repo, &image, &remote, &[image.display().to_string()]).unwrap(),
            vec![false]
        );
    }

    #[test]
    fn empty_image_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.img");
        std::fs::write(&path, b"").unwrap();
        let e = refuse_empty_image(&path, 0).unwrap_err().to_string();
        assert!(refuse_empty_image(&path, 1).is_ok());
        assert!(e.contains("e.img") && e.contains("empty"), "{e}");
    }
}
