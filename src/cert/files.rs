//! Reading and writing the CA's files, and where they live by default.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::CertError;

/// Writes `contents` to `path` whole: into a new file beside it, then renamed over it, so a
/// Fulcrum watching `path` for changes never reads half a file. A `private` file (a key) is
/// readable by its owner only, whatever the umask.
pub(crate) fn write(path: &Path, contents: &[u8], private: bool) -> Result<(), CertError> {
    let io_error = |action, source| CertError::Io {
        path: path.to_path_buf(),
        action,
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| io_error("create its directory", e))?;
    }
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(path.file_name().unwrap_or_default());
    temp_name.push(format!(".{}.tmp", std::process::id()));
    let temp = path.with_file_name(temp_name);
    // Left over from a run that died between create and rename.
    let _ = fs::remove_file(&temp);
    let mode = if private { 0o600 } else { 0o644 };
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temp)
        .and_then(|mut file| {
            if private {
                file.set_permissions(fs::Permissions::from_mode(mode))?;
            }
            file.write_all(contents)?;
            file.sync_all()
        })
        .and_then(|()| fs::rename(&temp, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&temp);
        return Err(io_error("write", e));
    }
    Ok(())
}

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    fs::read(path).map_err(|source| CertError::Io {
        path: path.to_path_buf(),
        action: "read",
        source,
    })
}

/// Creates `dir` (and its parents) readable by its owner only: it holds a CA's key.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), CertError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CertError::Io {
            path: dir.to_path_buf(),
            action: "create the directory",
            source,
        })
}

/// `$XDG_DATA_HOME/fulcrum/<what>`, else `$HOME/.local/share/fulcrum/<what>`, as the XDG
/// base directory spec has it (an empty or relative `XDG_DATA_HOME` counts as unset).
pub(crate) fn data_dir(what: &str) -> Option<PathBuf> {
    let from_env = |name| std::env::var_os(name).map(PathBuf::from);
    let data_home = from_env("XDG_DATA_HOME")
        .filter(|p| p.is_absolute())
        .or_else(|| {
            from_env("HOME")
                .filter(|p| !p.as_os_str().is_empty())
                .map(|home| home.join(".local/share"))
        })?;
    Some(data_home.join("fulcrum").join(what))
}

/// `prefix` with `extension` appended (`app.test` + `pem` → `app.test.pem`, where
/// `Path::with_extension` would replace `.test`).
pub(crate) fn with_suffix(prefix: &Path, extension: &str) -> PathBuf {
    let mut path = prefix.as_os_str().to_owned();
    path.push(".");
    path.push(extension);
    PathBuf::from(path)
}

/// Seconds from now to `unix_seconds` (negative when it has passed).
pub(crate) fn seconds_from_now(unix_seconds: i64) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    unix_seconds - now
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_suffix_is_appended_not_swapped_for_the_last_label() {
        assert_eq!(
            with_suffix(Path::new("certs/app.test"), "pem"),
            PathBuf::from("certs/app.test.pem")
        );
    }

    #[test]
    fn a_private_file_is_owner_only_even_when_it_replaces_an_open_one() {
        let dir = std::env::temp_dir().join(format!("fulcrum-cert-files-{}", std::process::id()));
        let path = dir.join("new/key.pem");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, "old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write(&path, b"new", true).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1,
            "no temp file left"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
