//! Output directories (compressed checkpoints, Hessian directories) written whole or not at
//! all.
//!
//! A run writes into a temporary sibling `.NAME.pumice-tmp-PID` and moves it into place at the
//! end:
//! - without `--force` the move never replaces anything (Linux: `renameat2(RENAME_NOREPLACE)`),
//!   so of two runs racing to one new output the second fails instead of replacing the first;
//! - with `--force` the finished directory and the old output trade places in one step
//!   (Linux: `RENAME_EXCHANGE`), so at every instant `NAME` is the old output or the new one;
//!   the old one, now under the temporary name, is then removed.
//!
//! A process killed at any instant can leave a temporary sibling behind; the next run writing
//! `NAME` removes siblings of processes that no longer run. Where an atomic exchange is not
//! available (other systems, file systems without it) the old output is moved aside to
//! `.NAME.pumice-old-PID` first; should the process die between the two moves, the next run
//! puts that old output back.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

const TMP: &str = "pumice-tmp-";
const OLD: &str = "pumice-old-";

/// A temporary output directory, removed on drop unless committed.
pub(crate) struct TempDir {
    pub path: PathBuf,
    keep: bool,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            remove_any(&self.path);
        }
    }
}

fn remove_any(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

fn parts(out: &Path) -> (PathBuf, String) {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    (parent, name)
}

/// Whether process `pid` still runs (Linux: /proc; elsewhere assumed, so nothing is touched).
pub(crate) fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

/// Tidy what killed runs left next to `out`: temporary siblings are removed; an old output
/// moved aside is put back when `out` is missing (its replacement never arrived), else removed.
pub(crate) fn recover(out: &Path) {
    let (parent, name) = parts(out);
    let Ok(rd) = std::fs::read_dir(&parent) else {
        return;
    };
    let mut entries: Vec<(PathBuf, String)> = rd
        .flatten()
        .map(|e| (e.path(), e.file_name().to_string_lossy().into_owned()))
        .collect();
    entries.sort();
    let dead = |f: &str, kind: &str| {
        f.strip_prefix(&format!(".{name}.{kind}"))
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|pid| pid != std::process::id() && !process_alive(pid))
    };
    for (path, f) in &entries {
        if dead(f, OLD) {
            if std::fs::symlink_metadata(out).is_err() && std::fs::rename(path, out).is_ok() {
                tracing::warn!(
                    "{}: put back the previous output a killed run had moved aside",
                    out.display()
                );
                continue;
            }
            remove_any(path);
        } else if dead(f, TMP) {
            remove_any(path);
        }
    }
}

/// A temporary sibling of `out` to write into, named after this process. (Leftovers of killed
/// runs were tidied by [`recover`], which the output check runs first.)
pub(crate) fn begin(out: &Path) -> Result<TempDir> {
    let (parent, name) = parts(out);
    let path = parent.join(format!(".{name}.{TMP}{}", std::process::id()));
    remove_any(&path);
    std::fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
    Ok(TempDir { path, keep: false })
}

#[cfg(target_os = "linux")]
fn rename2(from: &Path, to: &Path, flags: libc::c_uint) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: both pointers are NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether an error means "this file system or kernel has no renameat2 of that kind".
#[cfg(target_os = "linux")]
fn unsupported(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS))
}

fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

fn appeared(out: &Path) -> Error {
    Error::InvalidArgument(format!(
        "{}: appeared while this run worked (another run wrote it?); nothing was replaced (pass --force to replace it)",
        out.display()
    ))
}

/// Move the finished `tmp` into place as `out`; replace an existing `out` only when `force`.
pub(crate) fn commit(mut tmp: TempDir, out: &Path, force: bool) -> Result<()> {
    sync_dir(&tmp.path);
    #[cfg(target_os = "linux")]
    {
        let flags = if force && exists(out) {
            libc::RENAME_EXCHANGE
        } else {
            libc::RENAME_NOREPLACE
        };
        match rename2(&tmp.path, out, flags) {
            Ok(()) => {
                if flags == libc::RENAME_EXCHANGE {
                    // `tmp.path` now holds the old output: dropping `tmp` removes it.
                    sync_parent(out);
                } else {
                    tmp.keep = true;
                    sync_parent(out);
                }
                return Ok(());
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && !force => {
                return Err(appeared(out));
            }
            Err(e) if unsupported(&e) => {}
            Err(e) => return Err(Error::io(out, e)),
        }
    }
    // Portable path: move the old output aside, the new one in, then drop the old one.
    let mut old = None;
    if exists(out) {
        if !force {
            return Err(appeared(out));
        }
        let (parent, name) = parts(out);
        let aside = parent.join(format!(".{name}.{OLD}{}", std::process::id()));
        remove_any(&aside);
        std::fs::rename(out, &aside).map_err(|e| Error::io(out, e))?;
        old = Some(aside);
    }
    if let Err(e) = std::fs::rename(&tmp.path, out) {
        if let Some(a) = &old {
            let _ = std::fs::rename(a, out);
        }
        return Err(Error::io(out, e));
    }
    tmp.keep = true;
    sync_parent(out);
    if let Some(a) = old {
        remove_any(&a);
    }
    Ok(())
}

fn sync_dir(p: &Path) {
    if let Ok(d) = std::fs::File::open(p) {
        let _ = d.sync_all();
    }
}

fn sync_parent(out: &Path) {
    sync_dir(&parts(out).0);
}

/// `path` made absolute without requiring it to exist: its deepest existing ancestor
/// canonicalized, the rest appended.
pub(crate) fn resolved(path: &Path) -> Option<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().ok()?.join(path)
    };
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = std::fs::canonicalize(cur) {
            return Some(rest.iter().rev().fold(c, |p: PathBuf, n| p.join(n)));
        }
        rest.push(cur.file_name()?.to_os_string());
        cur = cur.parent()?;
    }
}

/// Refuse an output that is, contains or lies inside one of the directories the job reads or
/// keeps (`inputs`: a work directory, saved Hessians): replacing it would destroy them.
pub(crate) fn check_output_apart(out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let Some(o) = resolved(out) else {
        return Ok(());
    };
    for (what, p) in inputs {
        if let Some(p) = resolved(p) {
            if o == p || p.starts_with(&o) || o.starts_with(&p) {
                return Err(Error::InvalidArgument(format!(
                    "{}: the output would overwrite the {what} {} the job reads",
                    out.display(),
                    p.display()
                )));
            }
        }
    }
    Ok(())
}

/// Refuse an output that would replace the input `input_dir`, or that exists without `force`,
/// or whose parent is missing; tidy leftovers of killed runs writing it first.
pub(crate) fn check_output(input_dir: &Path, out: &Path, force: bool) -> Result<()> {
    let input = std::fs::canonicalize(input_dir).map_err(|e| Error::io(input_dir, e))?;
    recover(out);
    if out.exists() {
        let o = std::fs::canonicalize(out).map_err(|e| Error::io(out, e))?;
        if o == input || input.starts_with(&o) {
            return Err(Error::InvalidArgument(format!(
                "{}: refusing to overwrite the input model",
                out.display()
            )));
        }
        if !force {
            return Err(Error::InvalidArgument(format!(
                "{}: already exists (pass --force to replace it)",
                out.display()
            )));
        }
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "{}: no such directory",
                parent.display()
            )));
        }
    }
    Ok(())
}

/// The name, in a job's work directory, of the record of the output the job is committing.
pub(crate) const OUTPUT_RECORD: &str = "output.json";

/// SHA-256 over the regular files directly in `dir` (names and contents, in name order): what
/// an output directory holds.
pub(crate) fn digest(dir: &Path) -> Result<String> {
    let mut files: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    files.sort();
    let mut parts = Vec::with_capacity(files.len());
    for (name, path) in &files {
        parts.push(format!(
            "{name}\t{}",
            crate::base::hash::sha256_files(&[path.as_path()])?
        ));
    }
    Ok(crate::base::hash::sha256_hex(parts.join("\n").as_bytes()))
}

/// Record in `work_dir`, before the finished temporary directory `tmp` is moved into place,
/// that the job `fingerprint` is writing exactly these files: a run resumed after a kill that
/// fell between the move and the process's end recognizes the output as its own
/// ([`written_by`]) instead of refusing to replace it.
pub(crate) fn record_output(work_dir: &Path, fingerprint: &str, tmp: &Path) -> Result<()> {
    let rec = serde_json::json!({ "fingerprint": fingerprint, "digest": digest(tmp)? });
    crate::base::atomic::write_atomic(
        &work_dir.join(OUTPUT_RECORD),
        &[rec.to_string().as_bytes(), b"\n"],
    )
}

/// Whether `out` holds exactly what the job `fingerprint` of `work_dir` recorded it was
/// committing (so replacing it with the resumed job's identical output loses nothing).
pub(crate) fn written_by(work_dir: &Path, fingerprint: &str, out: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(work_dir.join(OUTPUT_RECORD)) else {
        return false;
    };
    let Ok(rec) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    rec["fingerprint"].as_str() == Some(fingerprint)
        && out.is_dir()
        && digest(out).is_ok_and(|d| rec["digest"].as_str() == Some(d.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dead_pid() -> u32 {
        let mut c = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = c.id();
        c.wait().expect("wait");
        pid
    }

    fn dir_with(p: &Path, marker: &str) {
        std::fs::create_dir_all(p).unwrap();
        std::fs::write(p.join("marker"), marker).unwrap();
    }

    fn marker(p: &Path) -> String {
        std::fs::read_to_string(p.join("marker")).unwrap()
    }

    fn siblings(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn commit_without_force_never_replaces() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let t = begin(&out).unwrap();
        dir_with(&t.path, "first");
        // Another run finished first.
        dir_with(&out, "other");
        let e = commit(t, &out, false).unwrap_err();
        assert!(e.to_string().contains("appeared"), "{e}");
        assert_eq!(marker(&out), "other");
        assert_eq!(siblings(d.path()), ["out"]);
        // A plain file there is not replaced either.
        let f = d.path().join("file");
        std::fs::write(&f, "keep").unwrap();
        let t = begin(&f).unwrap();
        dir_with(&t.path, "new");
        assert!(commit(t, &f, false).is_err());
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "keep");
        assert_eq!(siblings(d.path()), ["file", "out"]);
    }

    #[test]
    fn commit_with_force_replaces_dirs_and_files_leaving_nothing() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        dir_with(&out, "old");
        let t = begin(&out).unwrap();
        dir_with(&t.path, "new");
        commit(t, &out, true).unwrap();
        assert_eq!(marker(&out), "new");
        let f = d.path().join("file");
        std::fs::write(&f, "old file").unwrap();
        let t = begin(&f).unwrap();
        dir_with(&t.path, "new");
        commit(t, &f, true).unwrap();
        assert_eq!(marker(&f), "new");
        assert_eq!(siblings(d.path()), ["file", "out"]);
    }

    #[test]
    fn leftovers_of_killed_runs_are_tidied() {
        let d = tempfile::tempdir().unwrap();
        let pid = dead_pid();
        let out = d.path().join("out");
        // Killed after an exchange (old output under the temporary name) and killed between
        // the portable path's two moves (old output aside, nothing in place).
        dir_with(&out, "new");
        dir_with(&d.path().join(format!(".out.{TMP}{pid}")), "old");
        std::fs::write(d.path().join(format!(".out.{OLD}{pid}")), "old file").unwrap();
        let lost = d.path().join("lost");
        dir_with(&d.path().join(format!(".lost.{OLD}{pid}")), "previous");
        // A running process's temporary directory is not touched.
        let mut live = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let working = d.path().join(format!(".out.{TMP}{}", live.id()));
        dir_with(&working, "in progress");
        recover(&out);
        recover(&lost);
        assert_eq!(marker(&out), "new");
        assert_eq!(marker(&lost), "previous");
        assert_eq!(marker(&working), "in progress");
        live.kill().unwrap();
        live.wait().unwrap();
        std::fs::remove_dir_all(&working).unwrap();
        assert_eq!(siblings(d.path()), ["lost", "out"]);
    }
}
