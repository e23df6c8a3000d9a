//! The one way the crate writes a file. What it promises:
//! - the data goes to a temporary file created exclusively (unpredictable name, `O_EXCL`, no symlink
//!   followed) in the target's folder, is flushed and synced, and only then takes the target's name;
//! - an existing target (a dangling symlink counts) is kept unless `overwrite`; without it, the final
//!   step is a no-clobber link, so of two writers racing for one new path exactly one succeeds and the
//!   other fails saying the file exists;
//! - a target that is not a regular file or a symlink (a folder, a FIFO, a device) is refused even with
//!   `overwrite`;
//! - on any error the temporary file is removed; a program that is interrupted mid-write can remove it
//!   too, by calling `remove_pending` from its signal handler (the `scconv-tch` binary does, on SIGINT
//!   and SIGTERM).
use crate::error::ScConvError;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Temporary files being written now, for `remove_pending`.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Writes `path` through `fill`, with the promises of the module documentation.
pub fn write_file(
    path: &Path,
    overwrite: bool,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<(), ScConvError> {
    let error = |reason: String| ScConvError::Write { path: path.display().to_string(), reason };
    check_target(path, overwrite).map_err(error)?;
    let folder = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut temporary = tempfile::Builder::new()
        .prefix(".scconv-")
        .suffix(".partial")
        .tempfile_in(folder)
        .map_err(|e| error(e.to_string()))?;
    let registered = Registered::new(temporary.path());
    let written = fill(temporary.as_file_mut())
        .and_then(|()| temporary.as_file_mut().flush())
        .and_then(|()| temporary.as_file().sync_all());
    written.map_err(|e| error(e.to_string()))?;
    let persisted = if overwrite {
        temporary.persist(path).map(drop)
    } else {
        temporary.persist_noclobber(path).map(drop)
    };
    drop(registered);
    persisted.map_err(|e| match e.error.kind() {
        std::io::ErrorKind::AlreadyExists => {
            error("the file exists (written meanwhile by another process?); pass --force (overwrite = true) to replace it".into())
        }
        _ => error(e.error.to_string()),
    })
}

/// Removes every temporary file a `write_file` in progress holds. For signal handlers: after it, the
/// interrupted writes cannot complete.
pub fn remove_pending() {
    // A plain lock: the CLI's signal handling runs this on a thread of its own, and writers hold the
    // lock only to add or remove a path.
    let pending = match PENDING.lock() {
        Ok(pending) => pending.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    for path in pending {
        let _ = std::fs::remove_file(path);
    }
}

/// Keeps a temporary file's path in `PENDING` while it exists.
pub(crate) struct Registered(PathBuf);

impl Registered {
    pub(crate) fn new(path: &Path) -> Registered {
        if let Ok(mut pending) = PENDING.lock() {
            pending.push(path.to_path_buf());
        }
        Registered(path.to_path_buf())
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut pending) = PENDING.lock() {
            pending.retain(|p| p != &self.0);
        }
    }
}

/// What the target path may be: absent, or (with `overwrite`) a regular file or a symlink.
fn check_target(path: &Path, overwrite: bool) -> Result<(), String> {
    if path.file_name().is_none() {
        return Err("not a file path".into());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            return Err(format!("the folder {} does not exist", parent.display()));
        }
    }
    let Ok(meta) = std::fs::symlink_metadata(path) else { return Ok(()) };
    let kind = meta.file_type();
    if kind.is_dir() {
        return Err("is a folder; give a file path such as model.pt".into());
    }
    if !kind.is_file() && !kind.is_symlink() {
        return Err("is not a regular file (a FIFO, a device or a socket); refused even with --force".into());
    }
    if !overwrite {
        let what = if kind.is_symlink() { "a symlink is there" } else { "the file exists" };
        return Err(format!("{what}; pass --force (overwrite = true) to replace it"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("scconv-output-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        let names =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned());
        names.filter(|n| n.ends_with(".partial")).collect()
    }

    #[test]
    fn writes_keeps_replaces_and_cleans_up() {
        let dir = scratch("basic");
        let target = dir.join("out.bin");
        write_file(&target, false, |f| f.write_all(b"one")).unwrap();
        let err = write_file(&target, false, |f| f.write_all(b"two")).unwrap_err().to_string();
        assert!(err.contains("the file exists"), "{err}");
        assert_eq!(std::fs::read(&target).unwrap(), b"one");
        write_file(&target, true, |f| f.write_all(b"three")).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"three");
        let failing =
            write_file(&dir.join("failed.bin"), false, |_| Err(std::io::Error::other("disk on fire")));
        assert!(failing.unwrap_err().to_string().contains("disk on fire"));
        assert!(!dir.join("failed.bin").exists());
        assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
        assert!(!PENDING.lock().unwrap().iter().any(|p| p.starts_with(&dir)), "nothing left registered");
    }

    #[test]
    fn symlinks_folders_and_fifos_are_handled_as_promised() {
        let dir = scratch("links");
        let victim = dir.join("victim.txt");
        std::fs::write(&victim, b"keep").unwrap();
        let link = dir.join("link.pt");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let err = write_file(&link, false, |f| f.write_all(b"x")).unwrap_err().to_string();
        assert!(err.contains("a symlink is there"), "{err}");
        write_file(&link, true, |f| f.write_all(b"new")).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep", "the link is replaced, its target untouched");
        let dangling = dir.join("dangling.pt");
        std::os::unix::fs::symlink(dir.join("nowhere"), &dangling).unwrap();
        assert!(write_file(&dangling, false, |f| f.write_all(b"x")).is_err(), "a dangling link exists");
        let err = write_file(&dir, true, |f| f.write_all(b"x")).unwrap_err().to_string();
        assert!(err.contains("is a folder"), "{err}");
        let err = write_file(Path::new("/dev/null"), true, |f| f.write_all(b"x")).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        let long = dir.join("n".repeat(253));
        write_file(&long, false, |f| f.write_all(b"x")).unwrap();
        assert!(leftovers(&dir).is_empty());
    }

    #[test]
    fn of_two_writers_racing_for_one_new_path_exactly_one_succeeds() {
        let dir = scratch("race");
        for round in 0..20 {
            let target = dir.join(format!("race-{round}.bin"));
            let results: Vec<bool> = std::thread::scope(|s| {
                let writers: Vec<_> = (0..2u8)
                    .map(|id| {
                        let target = target.clone();
                        s.spawn(move || write_file(&target, false, |f| f.write_all(&[id; 4096])).is_ok())
                    })
                    .collect();
                writers.into_iter().map(|w| w.join().unwrap()).collect()
            });
            assert_eq!(results.iter().filter(|&&ok| ok).count(), 1, "round {round}: {results:?}");
            let bytes = std::fs::read(&target).unwrap();
            let winner = results.iter().position(|&ok| ok).unwrap() as u8;
            assert_eq!(bytes, vec![winner; 4096], "round {round}: the file holds the winner's data");
        }
        assert!(leftovers(&dir).is_empty());
    }
}
