//! The output directory of a run: an exclusive lock for the life of the process, the marker
//! that says a directory holds a run of ours (only such a directory is ever emptied), and the
//! clean-up of checkpoints whose save was killed midway.

use std::path::{Path, PathBuf};

use crate::error::{io_err, Result, TrainError};

/// A run's exclusive hold on its output directory, for the life of the process: an advisory
/// lock on `<dir>/.lock` (`flock`), which the OS releases when the process ends, even on
/// `kill -9`. The file holds the pid of the run that holds it.
#[derive(Debug)]
pub struct OutputLock {
    dir: PathBuf,
    _file: std::fs::File,
    /// This process created the directory, or the lock file in it: a run that fails before it
    /// starts (before [`OutputLock::mark`]) removes them again, leaving nothing behind.
    created_dir: bool,
    created_file: bool,
    marked: std::cell::Cell<bool>,
}

pub const LOCK_FILE: &str = ".lock";
/// Written when a run starts: only a directory holding it (or nothing) is ever emptied by
/// `--overwrite`.
pub const MARKER_FILE: &str = ".train-run";

impl OutputLock {
    /// Creates `dir` if needed and locks it; a directory another run holds is a one-line error
    /// naming that run's pid.
    pub fn acquire(dir: &Path) -> Result<Self> {
        use std::io::{Read, Seek, Write};
        if dir.exists() && !dir.is_dir() {
            return Err(TrainError::Invalid(format!(
                "{}: output directory is a file",
                dir.display()
            )));
        }
        let created_dir = !dir.exists();
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = dir.join(LOCK_FILE);
        let created_file = !path.exists();
        // Not truncated on open: the holder's pid must survive until the lock is ours.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(TrainError::Invalid(format!(
                    "{}: in use by another run (pid {}); wait for it to end or choose another \
                     output.dir",
                    dir.display(),
                    if holder.is_empty() { "unknown" } else { holder }
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&path)(e)),
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(io_err(&path))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            _file: file,
            created_dir,
            created_file,
            marked: std::cell::Cell::new(false),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the directory holds anything besides the lock.
    pub fn occupied(&self) -> Result<bool> {
        Ok(std::fs::read_dir(&self.dir)
            .map_err(io_err(&self.dir))?
            .filter_map(|e| e.ok())
            .any(|e| e.file_name() != LOCK_FILE))
    }

    /// Whether the directory holds a run of ours (its marker).
    pub fn holds_run(&self) -> bool {
        self.dir.join(MARKER_FILE).is_file()
    }

    /// Refuses to go on when the directory holds anything and the caller may not replace it;
    /// with `overwrite`, it must hold a run of ours.
    pub fn check_replaceable(&self, overwrite: bool, hint: &str) -> Result<()> {
        if !self.occupied()? {
            return Ok(());
        }
        if !overwrite {
            return Err(TrainError::Invalid(format!(
                "{}: output directory holds another run ({hint})",
                self.dir.display()
            )));
        }
        if !self.holds_run() {
            return Err(TrainError::Invalid(format!(
                "{}: not replacing this directory: it holds files but no run of `train` (no \
                 {MARKER_FILE}); choose another output.dir or empty it yourself",
                self.dir.display()
            )));
        }
        Ok(())
    }

    /// Empties the directory for a fresh run (the lock stays). Refuses a directory that holds
    /// files but no run of ours.
    pub fn clear(&self) -> Result<()> {
        self.check_replaceable(true, "")?;
        for entry in std::fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            if entry.file_name() == LOCK_FILE {
                continue;
            }
            let path = entry.path();
            let removed = if entry.file_type().map_err(io_err(&path))?.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.map_err(io_err(&path))?;
        }
        Ok(())
    }

    /// Marks the directory as holding a run of ours.
    pub fn mark(&self) -> Result<()> {
        self.marked.set(true);
        let path = self.dir.join(MARKER_FILE);
        let text = serde_json::json!({ "written_by": "train", "pid": std::process::id() });
        std::fs::write(&path, text.to_string() + "\n").map_err(io_err(&path))
    }

    /// Removes the staging directories that saves killed midway left behind
    /// (`.checkpoint-N.partial` and what `save_pretrained` stages inside its parent). Safe
    /// because no other run can be saving here while the lock is held.
    pub fn remove_stale_partials(&self) -> Result<usize> {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".checkpoint-") || name.starts_with("..checkpoint-") {
                let path = entry.path();
                let result = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                result.map_err(io_err(&path))?;
                removed += 1;
            }
        }
        if removed > 0 {
            eprintln!(
                "removed {removed} partial checkpoint(s) left in {} by an interrupted save",
                self.dir.display()
            );
        }
        Ok(removed)
    }
}

impl OutputLock {
    /// Starts a run in the directory: empties it when `fresh` (a resumed run keeps it), marks
    /// it as ours, and writes the fully resolved recipe as `recipe.toml`.
    pub fn begin(&self, recipe: &crate::Recipe, fresh: bool) -> Result<()> {
        if fresh {
            self.clear()?;
        }
        self.mark()?;
        let path = self.dir().join("recipe.toml");
        let text = recipe
            .to_toml()
            .map_err(|e| TrainError::Invalid(format!("writing recipe.toml: {e}")))?;
        std::fs::write(&path, text).map_err(io_err(&path))
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        if self.marked.get() {
            return;
        }
        // Best effort: only what this process added, the directory only if left empty.
        if self.created_file {
            let _ = std::fs::remove_file(self.dir.join(LOCK_FILE));
        }
        if self.created_dir {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}
