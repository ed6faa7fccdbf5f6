//! The kept rendering of the DRBD families: what a scrape serves without rendering anything.
//!
//! [`Renderings`] keeps, per resource, the [`Fragment`] rendered from its state (re-rendered only when
//! the state changed) and, once a scraper asked for gzip, the body compressed per family and group of
//! [`CHUNK`] resources ([`Renderings::compress`] recompresses only the groups whose text changed, told by
//! the fragments' stamps). [`Renderings::exposition`] takes an immutable snapshot of both, an
//! [`Exposition`], which a scrape writes out as text or as one gzip member without holding any lock.
//!
//! Everything here is pure: no locks, no clocks; the hub in `mod.rs` decides when to update and what to
//! serve.

use super::gzip::{Compressor, Deflated, GzipBody};
use super::render::{self, DrbdVersion, Fragment, Options, FAMILIES, FAMILY_COUNT, RESOURCES};
use crate::drbd::state::Resource;
use bytes::Bytes;
use std::sync::{Arc, OnceLock};

/// Resources per compressed group: large enough to compress well (tens of KB per family), small enough
/// that one changed resource recompresses little.
pub const CHUNK: usize = 64;

/// The families that are about resources (the global ones are rendered at every scrape).
fn resource_families() -> impl Iterator<Item = &'static render::FamilyDef> {
    FAMILIES.iter().skip(RESOURCES.index + 1)
}

/// One compressed group: the stamps of the family text it was made from, one per resource, and the
/// compressed text (`None` when every resource of the group has no samples of the family).
#[derive(Clone)]
struct Block {
    stamps: Box<[u64]>,
    piece: Option<Arc<Deflated>>,
}

/// The fragments of the resources and their compressed groups, kept between renderings.
#[derive(Default)]
pub struct Renderings {
    opts: Options,
    /// By resource name (sorted), with the state each fragment was rendered from.
    entries: Vec<(Arc<str>, Arc<Resource>, Arc<Fragment>)>,
    /// Per family index, per group of [`CHUNK`] entries; empty until [`Renderings::compress`] runs.
    blocks: Vec<Vec<Block>>,
    compressor: Compressor,
    /// Resources rendered anew by the last [`Renderings::update`].
    pub rendered: usize,
    /// Groups compressed anew by the last [`Renderings::compress`].
    pub compressed: usize,
}

impl Renderings {
    /// Brings the fragments up to date with `current` (the resources by name, sorted), rendered with
    /// `opts`: a resource whose state is the very same `Arc` keeps its fragment; a changed one is
    /// rendered anew (copying its one-hot families when they are the same).
    pub fn update(&mut self, opts: Options, current: Vec<(Arc<str>, Arc<Resource>)>) {
        if self.opts != opts {
            self.entries.clear();
            self.blocks.clear();
            self.opts = opts;
        }
        let mut old = std::mem::take(&mut self.entries).into_iter().peekable();
        let mut entries = Vec::with_capacity(current.len());
        let mut rendered = 0;
        for (name, res) in current {
            while old.next_if(|(n, _, _)| *n < name).is_some() {}
            let frag = match old.next_if(|(n, _, _)| *n == name) {
                Some((_, r, f)) if Arc::ptr_eq(&r, &res) => f,
                Some((_, r, f)) => {
                    rendered += 1;
                    Arc::new(Fragment::update(&res, opts, Some((&r, &f))))
                }
                None => {
                    rendered += 1;
                    Arc::new(Fragment::of(&res, opts))
                }
            };
            entries.push((name, res, frag));
        }
        self.entries = entries;
        self.rendered = rendered;
    }

    /// Compresses the groups whose text changed since they were compressed.
    pub fn compress(&mut self) {
        let groups = self.entries.len().div_ceil(CHUNK);
        self.blocks.resize_with(FAMILY_COUNT, Vec::new);
        let mut compressed = 0;
        for def in resource_families() {
            let blocks = &mut self.blocks[def.index];
            blocks.truncate(groups);
            for (g, chunk) in self.entries.chunks(CHUNK).enumerate() {
                let stamps: Box<[u64]> = chunk.iter().map(|(_, _, f)| f.stamp(def.index)).collect();
                if blocks.get(g).is_some_and(|b| b.stamps == stamps) {
                    continue;
                }
                let piece = stamps.iter().any(|&s| s != 0).then(|| {
                    compressed += 1;
                    Arc::new(
                        self.compressor
                            .piece(chunk.iter().map(|(_, _, f)| f.family(def.index).as_bytes())),
                    )
                });
                let block = Block { stamps, piece };
                match blocks.get_mut(g) {
                    Some(b) => *b = block,
                    None => blocks.push(block),
                }
            }
        }
        self.compressed = compressed;
    }

    /// Whether [`Renderings::compress`] keeps compressed groups.
    pub fn is_compressed(&self) -> bool {
        !self.blocks.is_empty()
    }

    /// A snapshot of what is kept, made from the state at `generation`: the compressed groups only when
    /// they are up to date (right after [`Renderings::compress`]).
    pub fn exposition(&self, generation: u64, version: DrbdVersion, gzip: bool) -> Exposition {
        let gzip = (gzip && self.is_compressed()).then(|| {
            let mut per_family = vec![Vec::new(); FAMILY_COUNT];
            for def in resource_families() {
                per_family[def.index] = self.blocks[def.index]
                    .iter()
                    .filter_map(|b| b.piece.clone())
                    .collect();
            }
            per_family
        });
        Exposition {
            generation,
            opts: self.opts,
            version,
            fragments: self.entries.iter().map(|(_, _, f)| f.clone()).collect(),
            gzip,
            text_body: OnceLock::new(),
            gzip_body: OnceLock::new(),
        }
    }
}

/// An immutable rendering of the DRBD families, as of one generation of the state.
pub struct Exposition {
    /// The hub's generation the state was read at.
    pub generation: u64,
    pub opts: Options,
    version: DrbdVersion,
    fragments: Vec<Arc<Fragment>>,
    /// Per family index, its compressed groups that have samples; `None` when not compressed.
    gzip: Option<Vec<Vec<Arc<Deflated>>>>,
    /// The text of the DRBD families, made once at the first scrape that wants it and then shared by
    /// every scraper of this generation.
    text_body: OnceLock<Bytes>,
    /// The start of the gzip member (header, global families and kept groups) with the CRC of its
    /// text, made once like `text_body`.
    gzip_body: OnceLock<Option<(Bytes, crc32fast::Hasher)>>,
}

/// The `# HELP`/`# TYPE` lines of each family, compressed once.
fn header_piece(def: &render::FamilyDef) -> &'static Deflated {
    static HEADERS: OnceLock<Vec<Deflated>> = OnceLock::new();
    &HEADERS.get_or_init(|| {
        let mut c = Compressor::default();
        FAMILIES
            .iter()
            .map(|d| {
                let mut h = String::new();
                render::push_header(&mut h, d);
                c.piece([h.as_bytes()])
            })
            .collect()
    })[def.index]
}

impl Exposition {
    /// Whether [`Exposition::write_gzip`] can be used.
    pub fn has_gzip(&self) -> bool {
        self.gzip.is_some()
    }

    /// Whether a scrape for `opts` (and gzip, when asked) can be served from it, given how the state has
    /// changed since: it was rendered with these options, has the compressed groups gzip needs, and
    /// `generation` matches unless `stale_ok`.
    pub fn serves(&self, opts: Options, gzip: bool, generation: u64, stale_ok: bool) -> bool {
        self.opts == opts
            && (!gzip || self.has_gzip())
            && (stale_ok || self.generation == generation)
    }

    /// Resources in it.
    pub fn resources(&self) -> usize {
        self.fragments.len()
    }

    /// Bytes of text (an upper bound).
    pub fn text_len(&self) -> usize {
        render::exposition_len(self.fragments.iter().map(|f| &**f))
    }

    /// Compressed bytes of the DRBD families, without the global ones; 0 when not compressed.
    pub fn compressed_len(&self) -> usize {
        self.gzip.as_ref().map_or(0, |g| {
            g.iter()
                .flatten()
                .map(|p| p.compressed_len())
                .sum::<usize>()
        })
    }

    /// Appends the text exposition of the DRBD families.
    pub fn write_text(&self, out: &mut String) {
        let frags: Vec<&Fragment> = self.fragments.iter().map(|f| &**f).collect();
        render::write_exposition(out, frags.len(), self.version, &frags);
    }

    /// The text of the DRBD families, shared: made at the first call, then the same bytes (reference
    /// counted, never copied) for every caller.
    pub fn text_bytes(&self) -> Bytes {
        self.text_body
            .get_or_init(|| {
                let mut out = String::with_capacity(self.text_len());
                self.write_text(&mut out);
                Bytes::from(out)
            })
            .clone()
    }

    /// The start of a gzip member holding the DRBD families (no final block, no trailer: finish it with
    /// [`super::gzip::finish_after`]) and the CRC of its text; shared like [`Exposition::text_bytes`].
    /// `None` without compressed groups ([`Exposition::has_gzip`]).
    pub fn gzip_prefix(&self) -> Option<(Bytes, crc32fast::Hasher)> {
        self.gzip_body
            .get_or_init(|| {
                self.has_gzip().then(|| {
                    let mut body = GzipBody::new(self.compressed_len() + 1024);
                    self.write_gzip(&mut body, &mut Compressor::default());
                    let (bytes, crc) = body.into_prefix();
                    (Bytes::from(bytes), crc)
                })
            })
            .clone()
    }

    /// Appends the DRBD families to a gzip body: the global families compressed now, then the kept
    /// groups. Writes nothing without compressed groups ([`Exposition::has_gzip`]).
    pub fn write_gzip(&self, body: &mut GzipBody, c: &mut Compressor) {
        let Some(gzip) = &self.gzip else { return };
        let mut globals = String::with_capacity(512);
        render::write_globals(&mut globals, self.fragments.len(), self.version);
        body.push(&c.piece([globals.as_bytes()]));
        for def in resource_families() {
            let pieces = &gzip[def.index];
            if pieces.is_empty() {
                continue;
            }
            body.push(header_piece(def));
            for p in pieces {
                body.push(p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drbd::types::{Role, Tri};
    use std::io::Read;

    fn gunzip(body: &[u8]) -> String {
        let mut out = String::new();
        flate2::read::GzDecoder::new(body)
            .read_to_string(&mut out)
            .expect("one valid gzip member");
        out
    }

    fn res(name: &str, score: u32) -> (Arc<str>, Arc<Resource>) {
        let r = Resource {
            name: name.to_string(),
            role: Role::Secondary,
            may_promote: Tri::Yes,
            promotion_score: score,
            ..Default::default()
        };
        (name.into(), Arc::new(r))
    }

    fn both(r: &mut Renderings, generation: u64) -> (String, String) {
        r.compress();
        let e = r.exposition(generation, DrbdVersion::default(), true);
        let mut text = String::new();
        e.write_text(&mut text);
        let mut body = GzipBody::new(0);
        e.write_gzip(&mut body, &mut Compressor::default());
        (text, gunzip(&body.finish()))
    }

    #[test]
    fn gzip_body_is_the_text_and_only_changed_groups_are_recompressed() {
        for enums in [false, true] {
            let opts = Options {
                enums,
                ..Default::default()
            };
            let mut state: Vec<_> = (0..200).map(|i| res(&format!("r{i:03}"), i)).collect();
            let mut r = Renderings::default();
            r.update(opts, state.clone());
            let (text, unzipped) = both(&mut r, 1);
            assert_eq!(unzipped, text);
            assert!(text.contains("drbd_resource_promotionscore{name=\"r199\"} 199\n"));
            let families_with_samples = resource_families()
                .filter(|d| text.contains(&format!("# TYPE {} ", d.name)))
                .count();
            assert_eq!(
                r.compressed,
                families_with_samples * 200usize.div_ceil(CHUNK)
            );

            // Nothing changed: nothing rendered, nothing compressed.
            r.update(opts, state.clone());
            let (again, _) = both(&mut r, 2);
            assert_eq!((r.rendered, r.compressed, &again), (0, 0, &text));

            // One score changed: one group of one family; the same role: its one-hot group is kept.
            state[70] = res("r070", 7000);
            r.update(opts, state.clone());
            let (text, unzipped) = both(&mut r, 3);
            assert_eq!((r.rendered, r.compressed), (1, 1));
            assert_eq!(unzipped, text);
            assert!(text.contains("drbd_resource_promotionscore{name=\"r070\"} 7000\n"));

            // A resource added at the front shifts every group: all recompressed, still the text.
            state.insert(0, res("a", 1));
            state.remove(150);
            r.update(opts, state.clone());
            let (text, unzipped) = both(&mut r, 4);
            assert_eq!(r.rendered, 1);
            assert_eq!(unzipped, text);
            assert!(text.contains("{name=\"a\"}") && !text.contains("\"r149\""));

            // Everything gone: the DRBD families are only the global ones.
            r.update(opts, Vec::new());
            let (text, unzipped) = both(&mut r, 5);
            assert_eq!(unzipped, text);
            assert!(text.contains("drbd_resource_resources 0\n"));
            assert!(!text.contains("drbd_resource_promotionscore"));
        }
    }

    #[test]
    fn a_snapshot_stays_as_it_was() {
        let opts = Options::default();
        let mut r = Renderings::default();
        r.update(opts, vec![res("a", 1)]);
        r.compress();
        let e = r.exposition(1, DrbdVersion::default(), true);
        r.update(opts, vec![res("a", 2), res("b", 3)]);
        r.compress();
        let mut text = String::new();
        e.write_text(&mut text);
        assert!(text.contains("{name=\"a\"} 1\n") && !text.contains("\"b\""));
        assert_eq!(e.resources(), 1);
        assert!(e.has_gzip());
        assert!(!r.exposition(2, DrbdVersion::default(), false).has_gzip());
    }
}
