//! Reading files named inside receipts, which are untrusted input.
//!
//! A receipt (or the study text stored in the database it names) can name any path: `/dev/zero`
//! (reading it never ends), a fifo (opening it blocks), a 100 GB file, someone's private key, or a
//! hub model id (resolving it downloads). `verify` therefore reads a path it found in a receipt
//! only when the path, symlinks followed, lies inside the bundle folder or a folder the user
//! named with `--root`, and is a regular file; reads are bounded; nothing is ever downloaded and
//! model specs are never resolved. Files the user names on the command line (`--db`,
//! `--study-file`, `--model`) are used as given, still only when they are regular files. A path
//! outside those folders is not an error: the check is reported as skipped, with what to pass to
//! make it.

use std::path::{Path, PathBuf};

/// Where a path from a receipt led.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    /// A regular file inside an allowed folder (canonical path).
    File(PathBuf),
    /// Outside every allowed folder: not read (the reason says what to pass).
    Outside(String),
    /// Inside an allowed folder (or named by the user) but missing or not a regular file.
    Refused(String),
}

/// The folders paths from receipts may lead into.
#[derive(Debug, Clone)]
pub struct ReadPolicy {
    roots: Vec<PathBuf>,
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

impl ReadPolicy {
    /// The bundle folder and the user's `--root` folders (those that exist).
    pub fn new(bundle_dir: &Path, roots: &[PathBuf]) -> ReadPolicy {
        let roots = std::iter::once(bundle_dir)
            .chain(roots.iter().map(PathBuf::as_path))
            .filter_map(|r| std::fs::canonicalize(r).ok())
            .collect();
        ReadPolicy { roots }
    }

    /// The allowed folders, canonical.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    fn inside(&self, p: &Path) -> bool {
        self.roots.iter().any(|r| p.starts_with(r))
    }

    /// A path found in a receipt or the stored study (relative paths are taken as given, from the
    /// current folder, as the writer recorded them).
    pub fn locate(&self, p: &Path) -> Located {
        let abs = absolute(p);
        match std::fs::canonicalize(&abs) {
            Ok(real) => {
                if !self.inside(&real) {
                    return Located::Outside(format!(
                        "{} is outside the bundle folder and every --root",
                        p.display()
                    ));
                }
                regular(p, real)
            }
            Err(_) => {
                // Missing: refuse when it would lie inside an allowed folder, else skip.
                let parent_real = abs
                    .parent()
                    .and_then(|d| std::fs::canonicalize(d).ok())
                    .map(|d| d.join(abs.file_name().unwrap_or_default()));
                match parent_real {
                    Some(pr) if self.inside(&pr) => {
                        Located::Refused(format!("{} does not exist", p.display()))
                    }
                    _ => Located::Outside(format!(
                        "{} is not in the bundle folder or a --root",
                        p.display()
                    )),
                }
            }
        }
    }

    /// A file the user named on the command line: used as given, if it is a regular file.
    pub fn explicit(p: &Path) -> Located {
        match std::fs::canonicalize(p) {
            Ok(real) => regular(p, real),
            Err(e) => Located::Refused(format!("{}: {e}", p.display())),
        }
    }
}

fn regular(shown: &Path, real: PathBuf) -> Located {
    match std::fs::metadata(&real) {
        Ok(m) if m.is_file() => Located::File(real),
        Ok(_) => Located::Refused(format!(
            "{} is not a regular file (devices, fifos and sockets are never read)",
            shown.display()
        )),
        Err(e) => Located::Refused(format!("{}: {e}", shown.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_the_bundle_and_special_files_are_not_read() {
        let d = std::env::temp_dir().join(format!("pgate-untrusted-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let bundle = d.join("bundle");
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::write(bundle.join("a.txt"), "x").unwrap();
        std::fs::write(d.join("outside.txt"), "x").unwrap();
        let pol = ReadPolicy::new(&bundle, &[]);
        assert!(matches!(
            pol.locate(&bundle.join("a.txt")),
            Located::File(_)
        ));
        assert!(matches!(
            pol.locate(&d.join("outside.txt")),
            Located::Outside(_)
        ));
        assert!(matches!(
            pol.locate(&bundle.join("../outside.txt")),
            Located::Outside(_)
        ));
        assert!(matches!(
            pol.locate(&bundle.join("gone.txt")),
            Located::Refused(_)
        ));
        assert!(matches!(
            pol.locate(Path::new("/dev/zero")),
            Located::Outside(_)
        ));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("/dev/zero", bundle.join("zero")).unwrap();
            assert!(matches!(
                pol.locate(&bundle.join("zero")),
                Located::Outside(_)
            ));
            let wide = ReadPolicy::new(&bundle, &[PathBuf::from("/dev")]);
            assert!(matches!(
                wide.locate(Path::new("/dev/zero")),
                Located::Refused(_)
            ));
            assert!(matches!(
                ReadPolicy::explicit(Path::new("/dev/zero")),
                Located::Refused(_)
            ));
        }
        let wide = ReadPolicy::new(&bundle, std::slice::from_ref(&d));
        assert!(matches!(
            wide.locate(&d.join("outside.txt")),
            Located::File(_)
        ));
    }
}
