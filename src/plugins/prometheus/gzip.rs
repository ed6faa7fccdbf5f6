//! One gzip member (RFC 1952) assembled from pieces compressed ahead of time.
//!
//! Each piece is compressed on its own as raw deflate (RFC 1951) by a fresh or reset compressor, and
//! ends with a sync flush: the last block is not final and the output ends on a byte boundary. A fresh
//! compressor has no history, so no piece refers back into another one, and any sequence of pieces is a
//! valid deflate stream once an empty final block follows. The gzip trailer needs the CRC-32 and the
//! length of the whole uncompressed text; the CRC of each piece is kept and the CRCs are combined
//! (`crc32fast::Hasher::combine`, logarithmic in the piece length), so the text is never read again.
//!
//! That lets the exporter keep the body of `/metrics` compressed per family and group of resources and
//! recompress only what changed, and still send one ordinary gzip stream.

use flate2::{Compress, Compression, FlushCompress, Status};

/// The gzip header: magic, deflate, no flags, no modification time, no extra flags, OS unknown.
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
/// An empty final block with fixed Huffman codes: BFINAL=1, BTYPE=01, end-of-block.
const FINAL_BLOCK: [u8; 2] = [0x03, 0x00];

/// Text compressed as a piece of a deflate stream, with the CRC-32 and length of the text.
#[derive(Debug, Clone)]
pub struct Deflated {
    bytes: Vec<u8>,
    crc: crc32fast::Hasher,
}

impl Deflated {
    /// Compressed bytes.
    pub fn compressed_len(&self) -> usize {
        self.bytes.len()
    }

    /// Bytes of text it holds.
    pub fn text_len(&self) -> u64 {
        self.crc.total_len()
    }
}

/// A raw deflate compressor at the fast level, reused (reset) for every piece.
pub struct Compressor(Compress);

impl Default for Compressor {
    fn default() -> Self {
        Compressor(Compress::new(Compression::fast(), false))
    }
}

impl Compressor {
    /// Compresses the concatenation of `parts` into one piece.
    pub fn piece<'a>(&mut self, parts: impl IntoIterator<Item = &'a [u8]> + Clone) -> Deflated {
        let c = &mut self.0;
        c.reset();
        let mut crc = crc32fast::Hasher::new();
        let total: usize = parts.clone().into_iter().map(<[u8]>::len).sum();
        let mut out = Vec::with_capacity(total / 6 + 64);
        for part in parts {
            crc.update(part);
            let mut input = part;
            while !input.is_empty() {
                out.reserve(input.len() / 4 + 64);
                let before = c.total_in();
                // Raw deflate into a vector with spare room cannot fail.
                let _ = c.compress_vec(input, &mut out, FlushCompress::None);
                input = &input[(c.total_in() - before) as usize..];
            }
        }
        // Sync flush: call again while it fills the output, as zlib asks.
        loop {
            out.reserve(64);
            let spare = out.capacity() - out.len();
            let before = out.len();
            let status = c.compress_vec(&[], &mut out, FlushCompress::Sync);
            if !matches!(status, Ok(Status::Ok)) || out.len() - before < spare {
                break;
            }
        }
        Deflated { bytes: out, crc }
    }
}

/// A gzip member being assembled from pieces, in order.
pub struct GzipBody {
    out: Vec<u8>,
    crc: crc32fast::Hasher,
}

impl GzipBody {
    /// Starts a body with room for about `capacity` compressed bytes.
    pub fn new(capacity: usize) -> GzipBody {
        let mut out = Vec::with_capacity(capacity + HEADER.len() + FINAL_BLOCK.len() + 8);
        out.extend_from_slice(&HEADER);
        GzipBody {
            out,
            crc: crc32fast::Hasher::new(),
        }
    }

    /// Appends a piece.
    pub fn push(&mut self, piece: &Deflated) {
        self.out.extend_from_slice(&piece.bytes);
        self.crc.combine(&piece.crc);
    }

    /// The member so far (header and pieces) and the CRC-32 of its text, to be finished later with
    /// [`finish_after`] (which appends more pieces, the final block and the trailer).
    pub fn into_prefix(self) -> (Vec<u8>, crc32fast::Hasher) {
        (self.out, self.crc)
    }

    /// The finished member: an empty final block, the CRC-32 and the length (modulo 2^32) of the text.
    pub fn finish(mut self) -> Vec<u8> {
        self.out.extend_from_slice(&FINAL_BLOCK);
        let len = self.crc.total_len() as u32;
        self.out
            .extend_from_slice(&self.crc.finalize().to_le_bytes());
        self.out.extend_from_slice(&len.to_le_bytes());
        self.out
    }
}

/// The end of a gzip member whose start (header and pieces, text CRC `prefix_crc`) is kept elsewhere:
/// the `tail` pieces, an empty final block and the trailer. Sending the kept start and then this is one
/// valid gzip member.
pub fn finish_after(prefix_crc: &crc32fast::Hasher, tail: &[&Deflated]) -> Vec<u8> {
    let mut body = GzipBody {
        out: Vec::with_capacity(tail.iter().map(|p| p.bytes.len()).sum::<usize>() + 16),
        crc: prefix_crc.clone(),
    };
    for p in tail {
        body.push(p);
    }
    body.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn gunzip(body: &[u8]) -> Vec<u8> {
        // A single-member decoder: the body must be one member, with a correct CRC and length.
        let mut d = flate2::read::GzDecoder::new(body);
        let mut out = Vec::new();
        d.read_to_end(&mut out).expect("valid gzip");
        out
    }

    /// About `len` bytes of exposition-like lines with pseudo-random values.
    fn text(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed;
        let mut out = Vec::with_capacity(len + 64);
        while out.len() < len {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            out.extend_from_slice(
                format!(
                    "drbd_peerdevice_sent_bytes{{name=\"r{}\"}} {}\n",
                    x % 1000,
                    x >> 40
                )
                .as_bytes(),
            );
        }
        out.truncate(len);
        out
    }

    #[test]
    fn pieces_make_one_gzip_member_with_the_whole_text() {
        let mut c = Compressor::default();
        let parts: Vec<Vec<u8>> = vec![
            text(1, 100_000),
            Vec::new(),
            text(2, 7),
            text(3, 300_000),
            b"x".to_vec(),
        ];
        let mut body = GzipBody::new(0);
        let mut whole = Vec::new();
        for p in &parts {
            // Each piece from the same, reset, compressor; one of them from two slices.
            let (a, b) = p.split_at(p.len() / 2);
            let d = c.piece([a, b]);
            assert_eq!(d.text_len(), p.len() as u64);
            body.push(&d);
            whole.extend_from_slice(p);
        }
        let body = body.finish();
        assert_eq!(gunzip(&body), whole);
        // Compressed, not stored: the repetitive text shrinks.
        assert!(
            body.len() < whole.len() / 2,
            "{} of {}",
            body.len(),
            whole.len()
        );
    }

    #[test]
    fn an_empty_body_is_valid_gzip() {
        assert!(gunzip(&GzipBody::new(0).finish()).is_empty());
    }

    #[test]
    fn pieces_can_be_reused_in_any_order() {
        let mut c = Compressor::default();
        let a = c.piece([&b"first\n"[..]]);
        let b = c.piece([&b"second\n"[..]]);
        let mut body = GzipBody::new(0);
        for p in [&b, &a, &b] {
            body.push(p);
        }
        assert_eq!(gunzip(&body.finish()), b"second\nfirst\nsecond\n");
    }

    #[test]
    fn the_system_gzip_reads_it() {
        // The real gzip(1), when the machine has it (Debian always does), checks CRC and length too.
        let mut c = Compressor::default();
        let t = text(7, 50_000);
        let mut body = GzipBody::new(0);
        body.push(&c.piece([&t[..10_000]]));
        body.push(&c.piece([&t[10_000..]]));
        let body = body.finish();
        let Ok(mut child) = std::process::Command::new("gzip")
            .arg("-dc")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            panic!("gzip(1) is not installed");
        };
        child.stdin.take().unwrap().write_all(&body).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "gzip -dc failed");
        assert_eq!(out.stdout, t);
    }
}
