//! Small file-system helpers for records others rely on (receipts, signatures, guard files, keys).
//!
//! - [`write_atomic`]: a reader (or a crash) sees the old file or the new one, never half of one:
//!   the bytes go to a temporary file in the same folder, are fsynced, and the file is renamed over
//!   the target (rename is atomic within one file system), then the folder is fsynced so the rename
//!   itself survives a power cut.
//! - [`create_new_private`]: write a file that must not exist yet, readable by its owner only
//!   (private keys: never overwrite one, never leave it world-readable, not even for a moment).
//! - [`read_regular_bounded`] / [`sha256_regular_bounded`]: read a file named by untrusted input:
//!   only a regular file (no `/dev/zero`, no fifo, no socket: those hang or never end), and never
//!   more than a limit.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Distinguishes temporary files of concurrent writers in one process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn parent_of(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Replace `path` with `bytes` atomically (temporary file in the same folder, fsync, rename,
/// fsync of the folder). The temporary file is removed when anything fails.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent_of(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .ok_or_else(|| Error::InvalidValue(format!("{}: not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        sync_dir(&dir);
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// fsync a folder so a rename in it is durable (best effort: not every platform allows it).
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Create `path`, which must not exist, with `bytes`, readable and writable by its owner only
/// (mode 0600 from the start on Unix), fsynced.
pub fn create_new_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::InvalidValue(format!(
                "{}: already exists; refusing to overwrite it",
                path.display()
            ))
        } else {
            Error::io(path, e)
        }
    })?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))?;
    sync_dir(&parent_of(path));
    Ok(())
}

/// Open `path` for reading only when it is a regular file (checked on the open handle, so a
/// swapped-in device or fifo is refused too), and return it with its size.
///
/// On Linux the file is opened with `O_NONBLOCK`, so opening a fifo cannot block before the check.
pub fn open_regular(path: &Path) -> Result<(std::fs::File, u64)> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK (0o4000 on Linux) keeps open(2) of a fifo from waiting for a writer; it has
        // no effect on reads of regular files.
        o.custom_flags(0o4000);
    }
    let f = o.open(path).map_err(|e| Error::io(path, e))?;
    let md = f.metadata().map_err(|e| Error::io(path, e))?;
    if !md.is_file() {
        return Err(Error::InvalidValue(format!(
            "{}: not a regular file (devices, fifos and sockets are never read)",
            path.display()
        )));
    }
    Ok((f, md.len()))
}

/// Read a regular file of at most `max` bytes (an error names the limit when it is larger).
pub fn read_regular_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    let (f, len) = open_regular(path)?;
    if len > max {
        return Err(too_large(path, len, max));
    }
    let mut buf = Vec::with_capacity(len as usize);
    // `take` bounds the read even when the file grows after the size check.
    f.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(path, e))?;
    if buf.len() as u64 > max {
        return Err(too_large(path, buf.len() as u64, max));
    }
    Ok(buf)
}

/// [`read_regular_bounded`] as UTF-8 text.
pub fn read_text_bounded(path: &Path, max: u64) -> Result<String> {
    String::from_utf8(read_regular_bounded(path, max)?)
        .map_err(|_| Error::InvalidValue(format!("{}: not UTF-8 text", path.display())))
}

/// sha256 (hex) and size of a regular file of at most `max` bytes, streamed.
pub fn sha256_regular_bounded(path: &Path, max: u64) -> Result<(String, u64)> {
    let (f, len) = open_regular(path)?;
    if len > max {
        return Err(too_large(path, len, max));
    }
    let mut r = f.take(max + 1);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        h.update(&buf[..n]);
    }
    if total > max {
        return Err(too_large(path, total, max));
    }
    Ok((hex::encode(h.finalize()), total))
}

fn too_large(path: &Path, len: u64, max: u64) -> Error {
    Error::InvalidValue(format!(
        "{}: {len} bytes, more than the {max} this reader accepts",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pgate-fsutil-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let d = tmp("atomic");
        let p = d.join("r.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(&d).unwrap().collect();
        assert_eq!(names.len(), 1, "a temporary file was left behind");
    }

    #[test]
    fn private_files_are_new_and_owner_only() {
        let d = tmp("private");
        let p = d.join("key");
        create_new_private(&p, b"secret").unwrap();
        assert!(create_new_private(&p, b"other").is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"secret");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn bounded_reads_refuse_devices_and_large_files() {
        let d = tmp("bounded");
        let p = d.join("f");
        std::fs::write(&p, vec![7u8; 100]).unwrap();
        assert_eq!(read_regular_bounded(&p, 100).unwrap().len(), 100);
        assert!(read_regular_bounded(&p, 99).is_err());
        assert_eq!(sha256_regular_bounded(&p, 100).unwrap().1, 100);
        #[cfg(unix)]
        {
            let e = read_regular_bounded(Path::new("/dev/zero"), 10).unwrap_err();
            assert!(e.to_string().contains("not a regular file"), "{e}");
            assert!(sha256_regular_bounded(Path::new("/dev/zero"), 10).is_err());
            let fifo = d.join("fifo");
            let ok = std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                let e = read_regular_bounded(&fifo, 10).unwrap_err();
                assert!(e.to_string().contains("not a regular file"), "{e}");
            }
        }
    }
}
