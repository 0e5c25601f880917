//! A small disk under a directory, for disk-full tests: a tmpfs of a
//! given size mounted over the directory (as root), its former contents
//! copied onto it, and a filler file that takes every free byte until
//! [`SmallDisk::free`] deletes it. Dropping it unmounts the tmpfs (lazily,
//! so a process still holding files there does not keep it mounted).

use anyhow::Result;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::netns::run;

pub struct SmallDisk {
    dir: PathBuf,
    filler: PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `mib` MiB over `dir`, keeping what `dir` held.
    /// Stop the processes using `dir` first.
    pub fn mount_over(dir: &Path, mib: u64) -> Result<SmallDisk> {
        let saved = dir.with_extension("before-tmpfs");
        std::fs::rename(dir, &saved)?;
        std::fs::create_dir_all(dir)?;
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
                &dir.display().to_string(),
            ],
        )?;
        let disk = SmallDisk {
            dir: dir.to_owned(),
            filler: dir.join("filler"),
        };
        run(
            "cp",
            &["-a", &format!("{}/.", saved.display()), &dir.display().to_string()],
        )?;
        std::fs::remove_dir_all(&saved)?;
        Ok(disk)
    }

    /// Writes the filler until the disk is full; returns the bytes it took.
    pub fn fill(&self) -> Result<u64> {
        let mut f = std::fs::File::create(&self.filler)?;
        let block = vec![0xa5u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => return Err(e.into()),
            }
        }
        // The last partial page too.
        for _ in 0..64 {
            if f.write(&block[..1024]).is_err() {
                break;
            }
            written += 1024;
        }
        let _ = f.sync_all();
        Ok(written)
    }

    /// Deletes the filler: the space is back.
    pub fn free(&self) -> Result<()> {
        std::fs::remove_file(&self.filler)?;
        Ok(())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = run("umount", &["-l", &self.dir.display().to_string()]);
    }
}
