//! Writing the promoter's unit files into the host's unit directory (default `/run/systemd/system`).
//!
//! - Atomic: each file is written to a temporary file in the same directory, then renamed over. The
//!   temporary name is unique (process, a per-process counter, the time) and created exclusively, so two
//!   writers never share one.
//! - One writer per directory: every [`UnitDir`] of one directory shares a lock, so the instances of the
//!   promoter policies that start together (after every reboot: `/run` is a tmpfs) write one after the
//!   other, and the templates they share are written once.
//! - Idempotent: a file whose content is unchanged is not written, so an unchanged configuration
//!   needs no `daemon-reload`; every call reports whether anything changed.
//! - Per resource: every file of a resource names it (second line), and the last one (its target's
//!   drop-in) is a manifest listing the others, so the files of a resource that left the policies, or of
//!   a start unit that left its list, are found and removed without a scan of the directory. A file is
//!   removed or overwritten only for the resource it names; the templates, which name none, are shared
//!   and stay.

use super::SystemdError;
use crate::plugins::promoter::units::{self, UnitFile, HEADER, RESOURCE_MARK};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

pub const DEFAULT_UNIT_DIR: &str = "/run/systemd/system";

/// Where the host's systemd looks for the templates (drbd-utils' and distribution units).
pub const TEMPLATE_SEARCH: &[&str] = &[
    "/etc/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

#[derive(Debug, Clone)]
pub struct UnitDir {
    dir: PathBuf,
    /// Shared by every `UnitDir` of this directory in the process.
    lock: Arc<Mutex<()>>,
}

fn files_err(dir: &Path, what: impl std::fmt::Display) -> SystemdError {
    SystemdError::Files {
        dir: dir.display().to_string(),
        message: what.to_string(),
    }
}

/// A path from a manifest or a generator must stay inside the unit directory.
fn safe_relative(p: &Path) -> bool {
    !p.as_os_str().is_empty()
        && p.components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// The lock of one unit directory (one per path in the process).
fn dir_lock(dir: &Path) -> Arc<Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>> = OnceLock::new();
    let key = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut m = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    m.entry(key).or_default().clone()
}

/// A temporary name no other writer uses: pid, a counter of this process, and the time.
fn temp_name(name: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(".{name}.{}.{n}.{t:x}.tmp", std::process::id())
}

/// Who a generated file belongs to: `Some(None)` for a shared one (a template), `Some(Some(res))` for
/// a resource's, `None` when it is not ours.
fn owner(content: &str) -> Option<Option<&str>> {
    let mut lines = content.lines();
    if lines.next() != Some(HEADER) {
        return None;
    }
    Some(lines.next().and_then(|l| l.strip_prefix(RESOURCE_MARK)))
}

impl UnitDir {
    pub fn new(dir: impl Into<PathBuf>) -> UnitDir {
        let dir = dir.into();
        let lock = dir_lock(&dir);
        UnitDir { dir, lock }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn locked(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes one file atomically unless it already has this content; returns whether it wrote.
    pub fn write(&self, f: &UnitFile) -> Result<bool, SystemdError> {
        let _g = self.locked();
        self.write_file(f)
    }

    fn write_file(&self, f: &UnitFile) -> Result<bool, SystemdError> {
        if !safe_relative(&f.path) {
            return Err(files_err(
                &self.dir,
                format!("refusing path {}", f.path.display()),
            ));
        }
        let path = self.dir.join(&f.path);
        if std::fs::read(&path).is_ok_and(|c| c == f.content.as_bytes()) {
            return Ok(false);
        }
        self.check_owner(f)?;
        let parent = path.parent().unwrap_or(&self.dir);
        std::fs::create_dir_all(parent)
            .map_err(|e| files_err(&self.dir, format!("{}: {e}", parent.display())))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = parent.join(temp_name(&name));
        let res = (|| -> std::io::Result<()> {
            let mut fh = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            fh.write_all(f.content.as_bytes())?;
            fh.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(files_err(&self.dir, format!("{}: {e}", path.display())));
        }
        Ok(true)
    }

    /// Another resource's file (two resources claiming one start unit) is not taken over.
    fn check_owner(&self, f: &UnitFile) -> Result<(), SystemdError> {
        let Some(mine) = owner(&f.content).flatten() else {
            return Ok(());
        };
        let path = self.dir.join(&f.path);
        let Ok(c) = std::fs::read_to_string(&path) else {
            return Ok(());
        };
        match owner(&c) {
            Some(Some(theirs)) if theirs != mine => Err(files_err(
                &self.dir,
                format!(
                    "{} belongs to DRBD resource '{theirs}', not '{mine}'",
                    path.display()
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Removes one file `res` generated (and its drop-in directory if that is then empty); returns
    /// whether it removed anything. A file without our header, or naming another resource, is left alone.
    fn remove(&self, res: &str, rel: &Path) -> Result<bool, SystemdError> {
        if !safe_relative(rel) {
            return Ok(false);
        }
        let path = self.dir.join(rel);
        match std::fs::read_to_string(&path) {
            Ok(c) if owner(&c) == Some(Some(res)) => {}
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(files_err(&self.dir, format!("{}: {e}", path.display()))),
        }
        std::fs::remove_file(&path)
            .map_err(|e| files_err(&self.dir, format!("{}: {e}", path.display())))?;
        if let Some(parent) = path.parent().filter(|p| *p != self.dir) {
            let _ = std::fs::remove_dir(parent); // only succeeds when empty
        }
        Ok(true)
    }

    fn manifest(&self, res: &str) -> Vec<PathBuf> {
        std::fs::read_to_string(self.dir.join(units::manifest_path(res)))
            .map(|c| units::manifest_files(&c))
            .unwrap_or_default()
    }

    /// Makes the files of one resource exactly `files` (as [`units::resource_files`] made them, manifest
    /// last): writes what changed, removes what the previous manifest listed and `files` does not.
    /// Returns whether anything changed (a `daemon-reload` is then needed).
    pub fn sync_resource(&self, res: &str, files: &[UnitFile]) -> Result<bool, SystemdError> {
        let _g = self.locked();
        let old = self.manifest(res);
        // all or nothing where another resource is in the way
        for f in files {
            if !safe_relative(&f.path) {
                continue; // write_file reports it
            }
            self.check_owner(f)?;
        }
        let mut changed = false;
        for f in files {
            changed |= self.write_file(f)?;
        }
        let keep: Vec<&Path> = files.iter().map(|f| f.path.as_path()).collect();
        for p in old.iter().filter(|p| !keep.contains(&p.as_path())) {
            changed |= self.remove(res, p)?;
        }
        if files.is_empty() {
            changed |= self.remove(res, &units::manifest_path(res))?;
        }
        Ok(changed)
    }

    /// Removes every file of a resource; returns whether anything was removed.
    pub fn remove_resource(&self, res: &str) -> Result<bool, SystemdError> {
        self.sync_resource(res, &[])
    }

    /// Installs the templates the host lacks: a template found in `search` (drbd-utils' or the
    /// distribution's) is used as it is; one in our directory without our header belongs to someone else.
    /// Returns whether anything was written.
    pub fn ensure_templates(
        &self,
        templates: &[UnitFile],
        search: &[PathBuf],
    ) -> Result<bool, SystemdError> {
        let _g = self.locked();
        let mut changed = false;
        for t in templates {
            if search.iter().any(|d| d.join(&t.path).exists()) {
                continue;
            }
            let ours = self.dir.join(&t.path);
            match std::fs::read_to_string(&ours) {
                Ok(c) if !c.starts_with(HEADER) => continue,
                _ => {}
            }
            changed |= self.write_file(t)?;
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::promoter::spec::test_resource as res;
    use crate::plugins::promoter::units::{resource_files, templates, UnitCommands};

    fn listing(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in walk(dir) {
            out.push(e.strip_prefix(dir).unwrap().display().to_string());
        }
        out.sort();
        out
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                v.extend(walk(&p));
            } else {
                v.push(p);
            }
        }
        v
    }

    #[test]
    fn sync_writes_once_updates_and_removes() {
        let tmp = tempfile::tempdir().unwrap();
        let ud = UnitDir::new(tmp.path());
        let c = UnitCommands::default();
        let r0 = resource_files(&res("r0", &["a.mount", "b.service"]), &c).unwrap();
        assert!(ud.sync_resource("r0", &r0).unwrap());
        assert!(
            !ud.sync_resource("r0", &r0).unwrap(),
            "unchanged content: no write, no reload"
        );
        let r1 = resource_files(&res("r1", &["c.service"]), &c).unwrap();
        assert!(ud.sync_resource("r1", &r1).unwrap());
        assert_eq!(listing(tmp.path()).len(), r0.len() + r1.len());
        // b.service leaves r0's list: its drop-in goes, the others stay
        let r0b = resource_files(&res("r0", &["a.mount"]), &c).unwrap();
        assert!(ud.sync_resource("r0", &r0b).unwrap());
        assert!(!tmp.path().join("b.service.d").exists());
        assert!(tmp.path().join("a.mount.d/reactor.conf").exists());
        // a file someone else put into a drop-in directory survives
        std::fs::write(tmp.path().join("a.mount.d/admin.conf"), "[Unit]\n").unwrap();
        assert!(ud.remove_resource("r0").unwrap());
        assert!(!ud.remove_resource("r0").unwrap());
        assert_eq!(
            listing(tmp.path()),
            vec![
                "a.mount.d/admin.conf".to_string(),
                "c.service.d/reactor.conf".into(),
                "drbd-promote@r1.service.d/reactor.conf".into(),
                "drbd-services@r1.target.d/reactor.conf".into(),
            ]
        );
        // no temporary files are left behind
        assert!(walk(tmp.path())
            .iter()
            .all(|p| !p.to_string_lossy().ends_with(".tmp")));
    }

    #[test]
    fn a_manifest_cannot_remove_foreign_or_outside_files() {
        let tmp = tempfile::tempdir().unwrap();
        let units = tmp.path().join("units");
        std::fs::create_dir(&units).unwrap();
        let outside = tmp.path().join("precious");
        std::fs::write(&outside, format!("{HEADER}\n")).unwrap();
        std::fs::write(units.join("foreign.conf"), "not ours\n").unwrap();
        // another resource's file: r0's manifest may list it, r0 does not own it
        std::fs::write(
            units.join("other.conf"),
            format!("{HEADER}\n{RESOURCE_MARK}r1\n"),
        )
        .unwrap();
        let m = units.join(units::manifest_path("r0"));
        std::fs::create_dir_all(m.parent().unwrap()).unwrap();
        std::fs::write(
            &m,
            format!(
                "{HEADER}\n{RESOURCE_MARK}r0\n{}../precious foreign.conf /etc/passwd other.conf\n",
                units::FILES_MARK
            ),
        )
        .unwrap();
        let ud = UnitDir::new(&units);
        assert!(ud.remove_resource("r0").unwrap());
        assert!(outside.exists());
        assert!(units.join("foreign.conf").exists());
        assert!(units.join("other.conf").exists());
        assert!(!m.exists());
        assert!(ud
            .write(&UnitFile {
                path: "../x".into(),
                content: String::new()
            })
            .is_err());
    }

    #[test]
    fn concurrent_writers_of_one_directory_all_succeed() {
        let tmp = tempfile::tempdir().unwrap();
        let c = UnitCommands::default();
        let n = 8;
        let threads: Vec<_> = (0..n)
            .map(|i| {
                let dir = tmp.path().to_path_buf();
                let c = c.clone();
                std::thread::spawn(move || {
                    // each writer has its own UnitDir, as each promoter instance does
                    let ud = UnitDir::new(&dir);
                    let name = format!("r{i}");
                    let files =
                        resource_files(&res(&name, &[&format!("s{i}.service")]), &c).unwrap();
                    ud.ensure_templates(&templates(), &[]).unwrap();
                    ud.sync_resource(&name, &files).unwrap();
                    files.len()
                })
            })
            .collect();
        let per: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        let all = listing(tmp.path());
        assert_eq!(all.len(), per + templates().len(), "{all:?}");
        for i in 0..n {
            assert!(
                all.contains(&format!("s{i}.service.d/reactor.conf")),
                "{all:?}"
            );
        }
        assert!(all.iter().all(|p| !p.ends_with(".tmp")), "{all:?}");
    }

    #[test]
    fn another_resources_file_is_neither_overwritten_nor_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let ud = UnitDir::new(tmp.path());
        let c = UnitCommands::default();
        let r0 = resource_files(&res("r0", &["shared.mount"]), &c).unwrap();
        let r1 = resource_files(&res("r1", &["shared.mount"]), &c).unwrap();
        assert!(ud.sync_resource("r0", &r0).unwrap());
        let e = ud.sync_resource("r1", &r1).unwrap_err().to_string();
        assert!(e.contains("belongs to DRBD resource 'r0', not 'r1'"), "{e}");
        let dropin = tmp.path().join("shared.mount.d/reactor.conf");
        assert!(std::fs::read_to_string(&dropin).unwrap().contains("r0"));
        // r1 leaves: whatever its manifest lists, r0's drop-in stays
        ud.remove_resource("r1").unwrap();
        assert!(dropin.exists());
        ud.remove_resource("r0").unwrap();
        assert!(!dropin.exists());
    }

    #[test]
    fn templates_only_where_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let units = tmp.path().join("run");
        let lib = tmp.path().join("lib");
        std::fs::create_dir_all(&units).unwrap();
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::write(lib.join("drbd-promote@.service"), "drbd-utils\n").unwrap();
        std::fs::write(units.join("ocf.rs@.service"), "admin's own\n").unwrap();
        let ud = UnitDir::new(&units);
        assert!(ud
            .ensure_templates(&templates(), std::slice::from_ref(&lib))
            .unwrap());
        assert!(!units.join("drbd-promote@.service").exists());
        assert!(units.join("drbd-services@.target").exists());
        assert!(units.join("drbd-demote-or-escalate@.service").exists());
        assert_eq!(
            std::fs::read_to_string(units.join("ocf.rs@.service")).unwrap(),
            "admin's own\n"
        );
        assert!(!ud.ensure_templates(&templates(), &[lib]).unwrap());
    }
}
