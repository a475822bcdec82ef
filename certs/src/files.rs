//! File writing with explicit modes: keys are created 0600 (never chmod-ed afterwards),
//! nothing is overwritten unless asked, replacements are atomic and durable (temporary
//! file, fsync, rename, fsync of the directory).

use crate::CaError;
use nix::fcntl::{Flock, FlockArg};
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Mode of private keys.
pub(crate) const KEY_MODE: u32 = 0o600;
/// Mode of certificates, CRLs and the index.
pub(crate) const PUBLIC_MODE: u32 = 0o644;
/// Mode of directories the CA creates.
const DIR_MODE: u32 = 0o700;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `dir` and its parents (mode 0700) if missing.
pub(crate) fn create_dir(dir: &Path) -> Result<(), CaError> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(io(dir))
}

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, CaError> {
    std::fs::read(path).map_err(io(path))
}

pub(crate) fn read_string(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(io(path))
}

pub(crate) fn remove_if_exists(path: &Path) -> Result<(), CaError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(path)(e)),
        _ => Ok(()),
    }
}

/// Writes `bytes` to `path`, creating the file with `mode`.
///
/// Without `replace`, an existing file is an error ([`CaError::Exists`]) and the check is
/// the atomic `O_CREAT|O_EXCL`. With `replace`, the bytes go to a new temporary file in the
/// same directory (created with `mode`) that is then renamed over `path`.
pub(crate) fn write(path: &Path, bytes: &[u8], mode: u32, replace: bool) -> Result<(), CaError> {
    if !replace {
        let mut file = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(CaError::Exists {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => return Err(io(path)(e)),
        };
        file.write_all(bytes).map_err(io(path))?;
        return file.sync_all().map_err(io(path));
    }
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let suffix: u64 = rand::random();
    let temp = path.with_file_name(format!(".{file_name}.{suffix:016x}.tmp"));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)
            .map_err(io(&temp))?;
        file.write_all(bytes).map_err(io(&temp))?;
        file.sync_all().map_err(io(&temp))?;
        std::fs::rename(&temp, path).map_err(io(path))?;
        sync_parent(path)
    })();
    if result.is_err() {
        // Best effort: the temporary file is garbage either way.
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// Syncs the directory holding `path`, so a rename into it is on disk before the next
/// file is written (the CRL before the index that depends on it).
fn sync_parent(path: &Path) -> Result<(), CaError> {
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Name of the lock file inside the CA directory.
const LOCK_FILE: &str = ".lock";

/// An exclusive `flock` on the CA directory's lock file, released on drop. Every change
/// to the index happens under it, so concurrent `razar-certs` runs never lose entries.
#[derive(Debug)]
pub(crate) struct DirLock {
    _lock: Flock<File>,
}

/// Waits for the exclusive lock on `dir`.
pub(crate) fn lock_dir(dir: &Path) -> Result<DirLock, CaError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(KEY_MODE)
        .open(&path)
        .map_err(io(&path))?;
    let lock = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| io(&path)(std::io::Error::from(errno)))?;
    Ok(DirLock { _lock: lock })
}
