//! A small map from `u32` keys (volume numbers, peer node ids) to values, kept as a sorted vector.
//!
//! A resource has a handful of volumes and peers; a `BTreeMap` node is sized for eleven entries, which
//! made each resource (and each copy-on-write copy of it) several times larger than its data.
//!
//! Values are kept behind `Arc`s, so cloning a map (and so a `Resource` that subscribers share) copies
//! pointers, not devices and connections; a value is copied only when it is changed while shared
//! (`get_mut` and the other `_mut` methods copy on write). Readers see plain `&V`.

use serde::ser::{Serialize, SerializeMap, Serializer};
use std::fmt;
use std::sync::Arc;

#[derive(Clone, PartialEq)]
pub struct VecMap<V> {
    entries: Vec<(u32, Arc<V>)>,
}

impl<V> Default for VecMap<V> {
    fn default() -> Self {
        VecMap {
            entries: Vec::new(),
        }
    }
}

impl<V> VecMap<V> {
    pub fn new() -> Self {
        Self::default()
    }

    fn find(&self, k: u32) -> Result<usize, usize> {
        self.entries.binary_search_by_key(&k, |(key, _)| *key)
    }

    pub fn get(&self, k: &u32) -> Option<&V> {
        self.find(*k).ok().map(|i| &*self.entries[i].1)
    }

    pub fn contains_key(&self, k: &u32) -> bool {
        self.find(*k).is_ok()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &u32> + ExactSizeIterator {
        self.entries.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl DoubleEndedIterator<Item = &V> + ExactSizeIterator {
        self.entries.iter().map(|(_, v)| &**v)
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&u32, &V)> + ExactSizeIterator {
        self.entries.iter().map(|(k, v)| (k, &**v))
    }

    /// Whether the value under `k` is the very same (shared) object in both maps: then it is equal too.
    pub fn same(&self, other: &VecMap<V>, k: &u32) -> bool {
        match (self.find(*k), other.find(*k)) {
            (Ok(a), Ok(b)) => Arc::ptr_eq(&self.entries[a].1, &other.entries[b].1),
            _ => false,
        }
    }
}

fn unshare<V: Clone>(v: Arc<V>) -> V {
    Arc::try_unwrap(v).unwrap_or_else(|v| (*v).clone())
}

/// Changing methods: a value shared with a clone of the map is copied first.
impl<V: Clone> VecMap<V> {
    pub fn get_mut(&mut self, k: &u32) -> Option<&mut V> {
        match self.find(*k) {
            Ok(i) => Some(Arc::make_mut(&mut self.entries[i].1)),
            Err(_) => None,
        }
    }

    pub fn insert(&mut self, k: u32, v: V) -> Option<V> {
        match self.find(k) {
            Ok(i) => Some(unshare(std::mem::replace(
                &mut self.entries[i].1,
                Arc::new(v),
            ))),
            Err(i) => {
                self.entries.insert(i, (k, Arc::new(v)));
                None
            }
        }
    }

    pub fn remove(&mut self, k: &u32) -> Option<V> {
        self.find(*k)
            .ok()
            .map(|i| unshare(self.entries.remove(i).1))
    }

    /// The value under `k`, inserted by `f` when absent; the flag tells whether it was inserted.
    pub fn get_or_insert_with(&mut self, k: u32, f: impl FnOnce() -> V) -> (&mut V, bool) {
        match self.find(k) {
            Ok(i) => (Arc::make_mut(&mut self.entries[i].1), false),
            Err(i) => {
                self.entries.insert(i, (k, Arc::new(f())));
                (Arc::make_mut(&mut self.entries[i].1), true)
            }
        }
    }

    pub fn values_mut(&mut self) -> impl DoubleEndedIterator<Item = &mut V> + ExactSizeIterator {
        self.entries.iter_mut().map(|(_, v)| Arc::make_mut(v))
    }

    pub fn iter_mut(
        &mut self,
    ) -> impl DoubleEndedIterator<Item = (&u32, &mut V)> + ExactSizeIterator {
        self.entries
            .iter_mut()
            .map(|(k, v)| (&*k, Arc::make_mut(v)))
    }
}

impl<V> std::ops::Index<&u32> for VecMap<V> {
    type Output = V;
    fn index(&self, k: &u32) -> &V {
        self.get(k).expect("no entry for key in VecMap")
    }
}

impl<V: Clone> FromIterator<(u32, V)> for VecMap<V> {
    fn from_iter<I: IntoIterator<Item = (u32, V)>>(it: I) -> Self {
        let mut m = VecMap::new();
        for (k, v) in it {
            m.insert(k, v);
        }
        m
    }
}

impl<V: fmt::Debug> fmt::Debug for VecMap<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<V: Serialize> Serialize for VecMap<V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.len()))?;
        for (k, v) in self.iter() {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_a_sorted_map() {
        let mut m = VecMap::new();
        assert_eq!(m.insert(3, "c"), None);
        assert_eq!(m.insert(1, "a"), None);
        assert_eq!(m.insert(2, "b"), None);
        assert_eq!(m.insert(2, "B"), Some("b"));
        assert_eq!(m.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(m[&2], "B");
        assert_eq!(m.remove(&1), Some("a"));
        assert!(!m.contains_key(&1) && m.len() == 2);
        let (v, created) = m.get_or_insert_with(0, || "z");
        assert!(created && *v == "z");
        let (_, created) = m.get_or_insert_with(0, || "y");
        assert!(!created);
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"0":"z","2":"B","3":"c"}"#
        );
    }

    #[test]
    fn clones_share_values_until_one_is_changed() {
        let mut a: VecMap<String> = [(1, "x".to_string()), (2, "y".to_string())]
            .into_iter()
            .collect();
        let b = a.clone();
        assert!(a.same(&b, &1) && a.same(&b, &2));
        a.get_mut(&2).unwrap().push('!');
        assert!(a.same(&b, &1), "untouched values stay shared");
        assert!(!a.same(&b, &2));
        assert_eq!((b[&2].as_str(), a[&2].as_str()), ("y", "y!"));
        // A value nobody shares is changed in place.
        let before = a.get(&2).unwrap() as *const String;
        a.get_mut(&2).unwrap().push('?');
        assert_eq!(a.get(&2).unwrap() as *const String, before);
        // Removing a shared value hands out a copy and leaves the other map intact.
        let mut c = b.clone();
        assert_eq!(c.remove(&1).as_deref(), Some("x"));
        assert_eq!(b.get(&1).map(String::as_str), Some("x"));
    }
}
