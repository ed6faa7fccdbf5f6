//! Policies from a directory of YAML files (the mode without Kubernetes).
//!
//! [`PolicyDir`] keeps, per file, the policies last read from it successfully. A file that becomes invalid
//! is reported and its previous policies stay in force; a file that disappears takes its policies with it.

use super::{parse_documents, policy_name, ReactorPolicy};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Default)]
pub struct PolicyDir {
    files: BTreeMap<PathBuf, Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    content: String,
    policies: Vec<ReactorPolicy>,
    error: Option<String>,
}

/// A problem with one file, as shown in `/status` and the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileProblem {
    pub file: String,
    pub error: String,
}

/// Reads the policy files of a directory: regular files (or links to them) ending in `.yaml` or `.yml`,
/// not starting with '.', not recursing.
pub fn read_dir(dir: &Path) -> std::io::Result<BTreeMap<PathBuf, String>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        // Unreadable, too large or not UTF-8: reported as a file whose content cannot be parsed.
        let content = read_bounded(&path).unwrap_or_else(|e| format!("\u{0}{e}"));
        out.insert(path, content);
    }
    Ok(out)
}

/// The largest policy file read: a ConfigMap holds at most 1 MiB, and a policy is a few KiB.
pub const MAX_POLICY_FILE: u64 = 1024 * 1024;

/// Reads a policy file of at most [`MAX_POLICY_FILE`] bytes without reading more of a larger one.
fn read_bounded(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let too_large = |n: u64| {
        format!("too large: {n} bytes or more, the limit is {MAX_POLICY_FILE} bytes (1 MiB); the file was not read")
    };
    let f = std::fs::File::open(path).map_err(|e| format!("unreadable: {e}"))?;
    let len = f.metadata().map_err(|e| format!("unreadable: {e}"))?.len();
    if len > MAX_POLICY_FILE {
        return Err(too_large(len));
    }
    let mut buf = Vec::new();
    f.take(MAX_POLICY_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("unreadable: {e}"))?;
    if buf.len() as u64 > MAX_POLICY_FILE {
        return Err(too_large(buf.len() as u64)); // it grew while being read
    }
    String::from_utf8(buf).map_err(|e| format!("unreadable: not UTF-8 ({e})"))
}

/// What only Kubernetes mode can do (ConfigMap scripts) is rejected with the field that asks for it.
fn file_mode_check(policies: &[ReactorPolicy]) -> Result<(), String> {
    for p in policies {
        if let Some(u) = &p.spec.umh {
            crate::plugins::umh::file_mode_check(u).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

impl PolicyDir {
    pub fn new() -> PolicyDir {
        PolicyDir::default()
    }

    /// Takes the current contents of the directory; returns the problems newly found (to be logged).
    pub fn update(&mut self, files: BTreeMap<PathBuf, String>) -> Vec<FileProblem> {
        let mut new_problems = Vec::new();
        self.files.retain(|p, _| files.contains_key(p));
        for (path, content) in files {
            if self.files.get(&path).is_some_and(|e| e.content == content) {
                continue;
            }
            let parsed = match content.strip_prefix('\u{0}') {
                Some(msg) => Err(msg.to_string()),
                None => parse_documents(&content)
                    .map_err(|e| e.to_string())
                    .and_then(|ps| file_mode_check(&ps).map(|()| ps)),
            };
            match parsed {
                Ok(policies) => {
                    self.files.insert(
                        path,
                        Entry {
                            content,
                            policies,
                            error: None,
                        },
                    );
                }
                Err(error) => {
                    let kept = self
                        .files
                        .get(&path)
                        .map(|e| e.policies.clone())
                        .unwrap_or_default();
                    new_problems.push(FileProblem {
                        file: path.display().to_string(),
                        error: error.clone(),
                    });
                    self.files.insert(
                        path,
                        Entry {
                            content,
                            policies: kept,
                            error: Some(error),
                        },
                    );
                }
            }
        }
        new_problems
    }

    /// The policies in force; a name defined by an earlier file wins over a later one.
    pub fn policies(&self) -> (Vec<ReactorPolicy>, Vec<FileProblem>) {
        let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut out = Vec::new();
        let mut problems = Vec::new();
        for (path, e) in &self.files {
            if let Some(err) = &e.error {
                problems.push(FileProblem {
                    file: path.display().to_string(),
                    error: err.clone(),
                });
            }
            for p in &e.policies {
                let name = policy_name(p).to_string();
                if let Some(first) = seen.get(&name) {
                    problems.push(FileProblem {
                        file: path.display().to_string(),
                        error: format!(
                            "metadata.name: policy '{name}' is already defined in {}",
                            first.display()
                        ),
                    });
                    continue;
                }
                seen.insert(name, path.clone());
                out.push(p.clone());
            }
        }
        (out, problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(name: &str, output: &str) -> String {
        format!("apiVersion: reactor.drbd.io/v1alpha1\nkind: ReactorPolicy\nmetadata:\n  name: {name}\nspec:\n  debugger:\n    output: {output}\n")
    }

    fn files(list: &[(&str, String)]) -> BTreeMap<PathBuf, String> {
        list.iter()
            .map(|(p, c)| (PathBuf::from(p), c.clone()))
            .collect()
    }

    #[test]
    fn invalid_file_keeps_previous_policies() {
        let mut d = PolicyDir::new();
        assert!(d
            .update(files(&[("/p/a.yaml", doc("a", "log"))]))
            .is_empty());
        let problems = d.update(files(&[("/p/a.yaml", doc("a", "paper"))]));
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].file, "/p/a.yaml");
        assert!(
            problems[0].error.starts_with("spec.debugger.output:"),
            "{}",
            problems[0].error
        );
        let (ps, probs) = d.policies();
        assert_eq!(ps.len(), 1);
        assert_eq!(
            ps[0].spec.debugger.as_ref().unwrap().output,
            crate::plugins::debugger::Output::Log
        );
        assert_eq!(probs.len(), 1);
        // unchanged invalid content is not reported again
        assert!(d
            .update(files(&[("/p/a.yaml", doc("a", "paper"))]))
            .is_empty());
        // fixed
        assert!(d
            .update(files(&[("/p/a.yaml", doc("a", "stdout"))]))
            .is_empty());
        assert!(d.policies().1.is_empty());
        // removed
        d.update(BTreeMap::new());
        assert!(d.policies().0.is_empty());
    }

    #[test]
    fn duplicate_names_first_file_wins() {
        let mut d = PolicyDir::new();
        d.update(files(&[
            ("/p/a.yaml", doc("x", "log")),
            ("/p/b.yaml", doc("x", "stdout")),
        ]));
        let (ps, probs) = d.policies();
        assert_eq!(ps.len(), 1);
        assert_eq!(probs[0].file, "/p/b.yaml");
        assert!(probs[0].error.contains("already defined in /p/a.yaml"));
    }

    #[test]
    fn a_huge_or_deeply_nested_file_is_rejected_and_the_previous_policies_stay() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.yaml");
        std::fs::write(&a, doc("a", "log")).unwrap();
        let mut d = PolicyDir::new();
        assert!(d.update(read_dir(dir.path()).unwrap()).is_empty());
        // 1 GiB (sparse): rejected without being read
        std::fs::File::create(&a).unwrap().set_len(1 << 30).unwrap();
        let f = read_dir(dir.path()).unwrap();
        assert!(f[&a].len() < 200, "the content was read");
        let problems = d.update(f);
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].error.starts_with("too large: 1073741824 bytes"),
            "{}",
            problems[0].error
        );
        assert_eq!(d.policies().0.len(), 1, "the policy in force stays");
        // deeply nested, under the size limit: a clear error, quickly
        let deep = format!("{}{}", "[".repeat(500_000), "]".repeat(500_000));
        std::fs::write(&a, deep).unwrap();
        let t = std::time::Instant::now();
        let problems = d.update(read_dir(dir.path()).unwrap());
        assert!(
            t.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].error.contains("nested deeper than 128 levels"),
            "{}",
            problems[0].error
        );
        // as deep block nesting, and a list of lists on one line
        for deep in [
            (0..200)
                .map(|i| format!("{}a{i}:\n", " ".repeat(i)))
                .collect::<String>(),
            "- ".repeat(300_000) + "x\n",
        ] {
            std::fs::write(&a, deep).unwrap();
            let problems = d.update(read_dir(dir.path()).unwrap());
            assert!(
                problems[0].error.contains("nested deeper"),
                "{}",
                problems[0].error
            );
        }
        // a real policy's nesting passes
        std::fs::write(&a, doc("a", "stdout")).unwrap();
        assert!(d.update(read_dir(dir.path()).unwrap()).is_empty());
        assert_eq!(d.policies().0.len(), 1, "the policy in force stays");
    }

    #[test]
    fn reads_only_yaml_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), doc("a", "log")).unwrap();
        std::fs::write(dir.path().join("b.yml"), doc("b", "log")).unwrap();
        std::fs::write(dir.path().join(".hidden.yaml"), "x").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        std::fs::create_dir(dir.path().join("sub.yaml")).unwrap();
        std::fs::write(dir.path().join("bin.yaml"), [0xff, 0xfe]).unwrap();
        let f = read_dir(dir.path()).unwrap();
        let names: Vec<_> = f
            .keys()
            .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, vec!["a.yaml", "b.yml", "bin.yaml"]);
        let mut d = PolicyDir::new();
        let problems = d.update(f);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].error.starts_with("unreadable"));
        assert_eq!(d.policies().0.len(), 2);
    }
}
