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

/// A disk whose fsyncs are slow: an `LD_PRELOAD` library, built here with
/// the C compiler `scripts/setup` installs, that delays every `fsync` and
/// `fdatasync` of the process by the milliseconds written in a control
/// file (read at each call, so a test slows the disk and heals it while
/// the process runs). The kernel here has no device mapper (`dmsetup
/// targets`: "/dev/mapper/control: open failed"), so dm-delay is out; the
/// delay sits before the real call, as a slow device's latency would.
pub struct SlowFsync {
    lib: PathBuf,
    control: PathBuf,
}

const SLOW_FSYNC_C: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static void delay(void) {
    const char *path = getenv("CUTOVER_SLOW_FSYNC_FILE");
    if (!path) return;
    FILE *f = fopen(path, "r");
    if (!f) return;
    long ms = 0;
    if (fscanf(f, "%ld", &ms) != 1) ms = 0;
    fclose(f);
    if (ms <= 0) return;
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0) {}
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    delay();
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    delay();
    return real(fd);
}
"#;

impl SlowFsync {
    /// Builds the library into `dir`, with no delay to begin with.
    pub fn build(dir: &Path) -> Result<SlowFsync> {
        let src = dir.join("slow-fsync.c");
        let lib = dir.join("libslowfsync.so");
        std::fs::write(&src, SLOW_FSYNC_C)?;
        run(
            "cc",
            &[
                "-shared",
                "-fPIC",
                "-O2",
                "-o",
                &lib.display().to_string(),
                &src.display().to_string(),
                "-ldl",
            ],
        )?;
        let control = dir.join("fsync-delay-ms");
        let this = SlowFsync { lib, control };
        this.set_delay_ms(0)?;
        Ok(this)
    }

    /// Every fsync from now on waits `ms` first (0: none).
    pub fn set_delay_ms(&self, ms: u64) -> Result<()> {
        std::fs::write(&self.control, ms.to_string())?;
        Ok(())
    }

    /// The environment that puts a process on this disk.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("LD_PRELOAD".into(), self.lib.display().to_string()),
            ("CUTOVER_SLOW_FSYNC_FILE".into(), self.control.display().to_string()),
        ]
    }
}
