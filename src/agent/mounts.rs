//! Refusing a block device in use: mounts, swap and holders, of the device
//! or one of its partitions.

use std::os::unix::fs::{FileTypeExt, MetadataExt};

use std::path::PathBuf;

use crate::agent::error::AgentError;

pub(super) type DevNum = (u32, u32);

/// Major and minor numbers of a `st_rdev` (glibc's encoding).
pub(super) fn dev_numbers(rdev: u64) -> DevNum {
    let major = ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff);
    let minor = ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff);
    (major as u32, minor as u32)
}

pub(super) fn parse_dev_numbers(text: &str) -> Option<DevNum> {
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Mount {
    pub(super) dev: DevNum,
    pub(super) mount_point: String,
    /// The mount source (`/dev/sda1`), which names the device even where
    /// `dev` does not (btrfs reports an anonymous device number).
    pub(super) source: String,
}

/// `/proc/self/mountinfo`: `id parent major:minor root mount-point options
/// [optional…] - fstype source super-options`. Lines that do not parse are
/// skipped.
pub(super) fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dev = parse_dev_numbers(fields.get(2)?)?;
            let mount_point = unescape(fields.get(4)?);
            let source = fields
                .iter()
                .skip(6)
                .position(|f| *f == "-")
                .and_then(|p| fields.get(6 + p + 2))
                .map(|s| unescape(s))
                .unwrap_or_default();
            Some(Mount {
                dev,
                mount_point,
                source,
            })
        })
        .collect()
}

/// `/proc/swaps`: a header, then `Filename Type Size Used Priority`.
pub(super) fn parse_swaps(text: &str) -> Vec<String> {
    text.lines()
        .filter(|line| !line.starts_with("Filename"))
        .filter_map(|line| line.split_whitespace().next())
        .map(unescape)
        .collect()
}

/// Undo the kernel's octal escapes (`\040` for a space).
pub(super) fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| {
            bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)) && d[0] <= b'3'
        });
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A block device and its partitions, each with a name for messages.
pub(super) fn device_family(name: &str, dev: DevNum) -> Vec<(DevNum, String)> {
    let mut family = vec![(dev, name.to_string())];
    let sys = PathBuf::from(format!("/sys/dev/block/{}:{}", dev.0, dev.1));
    if let Ok(entries) = std::fs::read_dir(&sys) {
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.join("partition").is_file() {
                continue;
            }
            let Some(part) = std::fs::read_to_string(path.join("dev"))
                .ok()
                .and_then(|t| parse_dev_numbers(&t))
            else {
                continue;
            };
            family.push((
                part,
                format!("partition {}", entry.file_name().to_string_lossy()),
            ));
        }
    }
    family
}

/// Everything that uses one of `family`: mounts, swap, holders
/// (device-mapper, RAID). `dev_of` gives a path's block device numbers.
pub(super) fn users_of(
    family: &[(DevNum, String)],
    mounts: &[Mount],
    swaps: &[String],
    holders: &[(DevNum, String)],
    dev_of: impl Fn(&str) -> Option<DevNum>,
) -> Vec<String> {
    let member = |dev: Option<DevNum>| {
        dev.and_then(|d| family.iter().find(|(f, _)| *f == d))
            .map(|(_, name)| name.as_str())
    };
    let mut users = Vec::new();
    for m in mounts {
        let source_dev = || {
            m.source
                .starts_with("/dev/")
                .then(|| dev_of(&m.source))
                .flatten()
        };
        if let Some(name) = member(Some(m.dev)).or_else(|| member(source_dev())) {
            users.push(format!("{name} is mounted on {}", m.mount_point));
        }
    }
    for s in swaps {
        if let Some(name) = member(dev_of(s)) {
            users.push(format!("{name} is used as swap"));
        }
    }
    for (dev, holder) in holders {
        if let Some(name) = member(Some(*dev)) {
            users.push(format!("{name} is held by {holder}"));
        }
    }
    users
}

/// Holders (`/sys/dev/block/M:m/holders/*`) of each member of a family.
pub(super) fn holders_of(family: &[(DevNum, String)]) -> Vec<(DevNum, String)> {
    let mut holders = Vec::new();
    for (dev, _) in family {
        let dir = format!("/sys/dev/block/{}:{}/holders", dev.0, dev.1);
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                holders.push((*dev, entry.file_name().to_string_lossy().into_owned()));
            }
        }
    }
    holders
}

pub(super) fn block_dev_of(path: &str) -> Option<DevNum> {
    let meta = std::fs::metadata(path).ok()?;
    meta.file_type()
        .is_block_device()
        .then(|| dev_numbers(meta.rdev()))
}

/// Refuse a block device that is mounted, used as swap or held, itself or
/// through a partition.
pub(super) fn refuse_if_in_use(name: &str, rdev: u64) -> Result<(), AgentError> {
    let family = device_family(name, dev_numbers(rdev));
    let mounts =
        parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default());
    let swaps = parse_swaps(&std::fs::read_to_string("/proc/swaps").unwrap_or_default());
    let holders = holders_of(&family);
    let users = users_of(&family, &mounts, &swaps, &holders, block_dev_of);
    if users.is_empty() {
        Ok(())
    } else {
        Err(AgentError::Target(format!(
            "refusing to write {name}: it is mounted or in use: {} (force_mounted overrides)",
            users.join("; ")
        )))
    }
}

#[cfg(test)]
mod tests {

    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::path::PathBuf;

    use super::{Mount, dev_numbers, parse_mountinfo, parse_swaps, unescape, users_of};
    use crate::agent::testkit::*;

    const MOUNTINFO: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 8:2 / / rw,relatime shared:1 - ext4 /dev/sda2 rw
30 27 8:1 / /boot/efi rw,relatime shared:5 - vfat /dev/sda1 rw
31 27 0:45 / /srv/my\\040data rw,relatime shared:7 - btrfs /dev/sdb1 rw,space_cache
32 27 259:3 / /home rw shared:9 master:2 - xfs /dev/nvme0n1p3 rw
garbage line
33 27 x:y / /bad rw - ext4 /dev/sdc rw
";

    #[test]
    fn mountinfo_parsing_finds_devices_points_and_sources() {
        let mounts = parse_mountinfo(MOUNTINFO);
        assert_eq!(mounts.len(), 5);
        assert_eq!(
            mounts[1],
            Mount {
                dev: (8, 2),
                mount_point: "/".into(),
                source: "/dev/sda2".into()
            }
        );
        assert_eq!(mounts[3].mount_point, "/srv/my data");
        assert_eq!(mounts[3].source, "/dev/sdb1");
        assert_eq!(mounts[4].dev, (259, 3));
        assert_eq!(mounts[4].source, "/dev/nvme0n1p3");
        assert!(parse_mountinfo("").is_empty());
        assert!(parse_mountinfo("1 2 3:4").is_empty());
    }

    #[test]
    fn swaps_parsing_skips_the_header() {
        let text = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n\
                    /dev/sda3                               partition\t8388604\t\t0\t\t-2\n\
                    /swap\\040file                           file\t\t1048572\t\t0\t\t-3\n";
        assert_eq!(parse_swaps(text), vec!["/dev/sda3", "/swap file"]);
        assert!(parse_swaps("Filename Type Size Used Priority\n").is_empty());
    }

    #[test]
    fn unescape_handles_octal_and_stray_backslashes() {
        assert_eq!(unescape("a\\040b\\011c"), "a b\tc");
        assert_eq!(unescape("\\134"), "\\");
        assert_eq!(unescape("trail\\"), "trail\\");
        assert_eq!(unescape("\\09x\\4"), "\\09x\\4");
    }

    #[test]
    fn users_of_a_disk_name_mounts_swap_and_holders_of_its_partitions() {
        let mounts = parse_mountinfo(MOUNTINFO);
        let dev_of = |path: &str| match path {
            "/dev/sda3" => Some((8, 3)),
            "/dev/sdb1" => Some((8, 17)),
            _ => None,
        };
        let swaps = vec!["/dev/sda3".to_string(), "/swapfile".to_string()];
        let sda = vec![
            ((8, 0), "/dev/sda".to_string()),
            ((8, 1), "partition sda1".to_string()),
            ((8, 2), "partition sda2".to_string()),
            ((8, 3), "partition sda3".to_string()),
        ];
        let users = users_of(&sda, &mounts, &swaps, &[], dev_of);
        assert_eq!(
            users,
            vec![
                "partition sda2 is mounted on /",
                "partition sda1 is mounted on /boot/efi",
                "partition sda3 is used as swap",
            ]
        );

        // btrfs: an anonymous device number, found through the source.
        let sdb = vec![
            ((8, 16), "/dev/sdb".to_string()),
            ((8, 17), "partition sdb1".to_string()),
        ];
        assert_eq!(
            users_of(&sdb, &mounts, &swaps, &[], dev_of),
            vec!["partition sdb1 is mounted on /srv/my data"]
        );

        let sdc = vec![((8, 32), "/dev/sdc".to_string())];
        assert!(users_of(&sdc, &mounts, &swaps, &[], dev_of).is_empty());
        let holders = vec![((8, 32), "dm-0".to_string())];
        assert_eq!(
            users_of(&sdc, &mounts, &swaps, &holders, dev_of),
            vec!["/dev/sdc is held by dm-0"]
        );
    }

    #[test]
    fn device_numbers_decode_like_glibc() {
        assert_eq!(dev_numbers(0x0801), (8, 1));
        assert_eq!(dev_numbers(0x10300), (259, 0));
        // major 259, minor 300: minor's high bits live above bit 20.
        let rdev = (259u64 & 0xfff) << 8 | (300u64 & 0xff) | (300u64 & !0xff) << 12;
        assert_eq!(dev_numbers(rdev), (259, 300));
    }

    /// Real block devices: needs root and loop devices.
    /// `cargo test --lib agent -- --ignored`
    #[test]
    #[ignore]
    fn loop_device_load_and_mount_refusal() {
        use std::process::Command;
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let backing = dir.path().join("backing.img");
        File::create(&backing).unwrap().set_len(8 << 20).unwrap();
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&backing)
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup failed");
        let device = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        struct Detach(PathBuf);
        impl Drop for Detach {
            fn drop(&mut self) {
                let _ = Command::new("umount")
                    .arg(&self.0)
                    .stderr(std::process::Stdio::null())
                    .status();
                let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
            }
        }
        let _detach = Detach(device.clone());

        // Stray data where the image has zeros is zeroed on a device too.
        std::fs::write(&device, vec![0x77u8; 8 << 20]).unwrap();
        let image = Image::new("rzt", 100, 17);
        let (result, replies) = run(&env, &image.load(&device, false, &image.data_chunks()));
        result.unwrap();
        assert_eq!(needed(&replies).2, CS as u64);
        let on_disk = std::fs::read(&device).unwrap();
        assert!(on_disk[..image.data.len()] == image.data[..]);
        assert_eq!(stamps(&env), 0, "block devices are not stamped");

        let too_big = Image::new(&"r".repeat(129), 0, 18);
        let e = err_of(run(&env, &[too_big.begin(&device, false)]).0);
        assert!(e.to_string().contains("the image needs"), "{e}");

        let status = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&device)
            .status()
            .unwrap();
        assert!(status.success());
        let mount_point = dir.path().join("mnt");
        std::fs::create_dir(&mount_point).unwrap();
        let status = Command::new("mount")
            .arg(&device)
            .arg(&mount_point)
            .status()
            .unwrap();
        assert!(status.success());
        let e = err_of(run(&env, &[image.begin(&device, false)]).0);
        let text = e.to_string();
        assert!(text.contains("mounted"), "{text}");
        assert!(text.contains(&*mount_point.to_string_lossy()), "{text}");
        drop(_detach);

        // A partitioned disk whose partition is mounted: an MBR with one
        // Linux partition at sector 2048.
        let backing = dir.path().join("partitioned.img");
        let mut mbr = [0u8; 512];
        mbr[446 + 4] = 0x83;
        mbr[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
        mbr[446 + 12..446 + 16].copy_from_slice(&16384u32.to_le_bytes());
        mbr[510..].copy_from_slice(&[0x55, 0xaa]);
        let file = File::create(&backing).unwrap();
        file.set_len(16 << 20).unwrap();
        file.write_all_at(&mbr, 0).unwrap();
        drop(file);
        let out = Command::new("losetup")
            .args(["-f", "--show", "-P"])
            .arg(&backing)
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup -P failed");
        let disk = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        let mut partition = disk.clone().into_os_string();
        partition.push("p1");
        let partition = PathBuf::from(partition);
        let _detach_disk = Detach(disk.clone());
        for _ in 0..20 {
            if partition.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        if !partition.exists() {
            eprintln!(
                "the kernel found no partition on {}: skipping",
                disk.display()
            );
            return;
        }
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = Command::new("umount").arg(&self.0).status();
            }
        }
        let _unmount = Unmount(partition.clone());
        let status = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&partition)
            .status()
            .unwrap();
        assert!(status.success());
        let status = Command::new("mount")
            .arg(&partition)
            .arg(&mount_point)
            .status()
            .unwrap();
        assert!(status.success());
        let e = err_of(run(&env, &[image.begin(&disk, false)]).0);
        let text = e.to_string();
        assert!(text.contains("partition loop"), "{text}");
        assert!(text.contains("is mounted on"), "{text}");
        assert!(text.contains(&*mount_point.to_string_lossy()), "{text}");
    }
}
