//! Checks made before the server opens its files, so that a failed start names its cause — the
//! directory or file, and why — rather than what SQLite made of it.
//!
//! One trap is handled here rather than only reported: SQLite creates `-wal` and `-shm` with
//! the mode of the database file. Opened while `socp.db` was read-only, it left them
//! read-only, and the server kept failing ("attempt to write a readonly database", naming
//! `socp.db`) after the operator had made `socp.db` writable again. Now a read-only database is
//! refused before SQLite opens it (so no such companions are made), and companions left
//! read-only by an earlier start are given mode 0600 again.

use std::fs::{OpenOptions, Permissions};
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Makes sure `dir` is a directory, creating it (mode 0700, with its parents) when missing.
/// With `writable`, also that this process may create files in it. `label` names it in errors
/// (e.g. "data directory").
pub fn prepare_dir(dir: &Path, label: &str, writable: bool) -> Result<(), String> {
    if dir.as_os_str().is_empty() {
        return Ok(()); // the working directory
    }
    let shown = dir.display();
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => {
            return Err(format!(
                "{label} {shown}: not a directory (it is a file); give another --data-dir, or \
                 move the file away"
            ));
        }
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound || e.kind() == ErrorKind::NotADirectory => {
            if let Err(e) = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
            {
                let why = match blocking_file(dir) {
                    Some(file) => format!("{} is not a directory", file.display()),
                    None => e.to_string(),
                };
                return Err(format!("{label} {shown}: cannot be created: {why}"));
            }
        }
        Err(e) => return Err(format!("{label} {shown}: {e}")),
    }
    if writable && !may_write(dir) {
        return Err(format!(
            "{label} {shown}: not writable by this server ({}); the database needs to create \
             its -wal and -shm files there",
            who_and_mode(dir)
        ));
    }
    Ok(())
}

/// Checks that the database file, if it exists, can be opened for writing, and repairs the
/// mode of a `-wal` or `-shm` left read-only (see the module documentation).
pub fn check_database(db: &Path) -> Result<(), String> {
    let shown = db.display();
    match std::fs::metadata(db) {
        Ok(meta) if meta.is_dir() => {
            return Err(format!("database {shown}: is a directory, not a file"));
        }
        Ok(_) => {
            if let Err(e) = OpenOptions::new().read(true).write(true).open(db) {
                return Err(if e.kind() == ErrorKind::PermissionDenied {
                    format!(
                        "database {shown}: not writable by this server ({}): {e}; make it \
                         writable (e.g. chmod 600 {shown}) and start again",
                        who_and_mode(db)
                    )
                } else {
                    format!("database {shown}: {e}")
                });
            }
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(format!("database {shown}: {e}")),
    }
    for suffix in ["-wal", "-shm"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        let companion = PathBuf::from(name);
        // No SQLite connection is open yet in this process, so opening and closing the file
        // here cannot drop any of its locks.
        match OpenOptions::new().read(true).write(true).open(&companion) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) if e.kind() == ErrorKind::PermissionDenied => {
                let mode = Permissions::from_mode(0o600);
                if let Err(fix) = std::fs::set_permissions(&companion, mode) {
                    return Err(format!(
                        "database {shown}: its {suffix} file {} is not writable ({}: {e}) and its \
                         mode cannot be changed ({fix}); make it writable, or remove it while no \
                         server uses this database",
                        companion.display(),
                        who_and_mode(&companion)
                    ));
                }
                log::warn!(
                    "{} was not writable (left by a start with a read-only database?): set its \
                     mode to 0600",
                    companion.display()
                );
            }
            Err(e) => return Err(format!("database {shown}: {}: {e}", companion.display())),
        }
    }
    Ok(())
}

/// The nearest ancestor of `dir` that exists and is not a directory, if any.
fn blocking_file(dir: &Path) -> Option<&Path> {
    dir.ancestors()
        .skip(1)
        .find(|p| std::fs::metadata(p).is_ok_and(|m| !m.is_dir()))
}

/// Whether this process may create files in `dir` (write and search permission).
fn may_write(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call; access() only
    // reads it. AT_EACCESS checks with the effective ids, as opening a file would.
    unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::W_OK | libc::X_OK,
            libc::AT_EACCESS,
        ) == 0
    }
}

/// "mode 0400, owner uid 1000; this server runs as uid 1000", for error messages.
fn who_and_mode(path: &Path) -> String {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    match std::fs::metadata(path) {
        Ok(m) => format!(
            "mode {:04o}, owner uid {}; this server runs as uid {me}",
            m.mode() & 0o7777,
            m.uid()
        ),
        Err(_) => format!("this server runs as uid {me}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("socp-startup-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_file_in_the_way_is_named() {
        let dir = temp("file");
        let file = dir.join("f");
        std::fs::write(&file, "x").unwrap();
        let err = prepare_dir(&file, "data directory", true).unwrap_err();
        assert!(err.contains("not a directory"), "{err}");
        let err = prepare_dir(&file.join("sub"), "data directory", true).unwrap_err();
        assert!(
            err.contains(&format!("{} is not a directory", file.display())),
            "{err}"
        );
        let made = dir.join("a/b");
        prepare_dir(&made, "data directory", true).unwrap();
        let mode = std::fs::metadata(&made).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_database_is_fine_and_a_directory_is_not() {
        let dir = temp("db");
        check_database(&dir.join("socp.db")).unwrap();
        let err = check_database(&dir).unwrap_err();
        assert!(err.contains("is a directory"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
