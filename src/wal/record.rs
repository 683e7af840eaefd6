//! One framed WAL record, encoded and decoded.
//!
//! A record must prove on its own that it was written whole (its CRC covers its type and
//! payload) and that it follows the record before it (its CRC also covers the previous record's
//! CRC). The first property separates a torn tail from written data; the second catches a lost,
//! duplicated or reordered record even when every record is individually intact.
//!
//! Layout: `[payload_len u32 LE][type u8][3 zero bytes][prev_crc u32 LE][crc u32 LE]`, payload,
//! zero padding to a multiple of [`RECORD_ALIGN`]. `crc = crc32c(prev_crc LE ++ [type] ++ payload)`.
//! The padding carries no data and is not covered by the CRC. An all-zero header marks the end
//! of the written data (segments are preallocated, so unwritten space reads as zeros).

use protobuf::Message;
use raft::eraftpb::{Entry, HardState};

/// Bytes in a record header.
pub(crate) const HEADER_BYTES: u64 = 16;
/// Every record starts at a multiple of this many bytes from the start of its segment.
pub(crate) const RECORD_ALIGN: u64 = 8;
/// The largest payload one record may carry. Bigger lengths in a header are garbage.
pub const MAX_RECORD_PAYLOAD_BYTES: u64 = 64 << 20;
/// A snapshot marker's payload: term and index, u64 LE each.
const SNAPSHOT_MARKER_PAYLOAD_BYTES: usize = 16;

/// What a record's payload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum RecordType {
    /// A protobuf `eraftpb::Entry`.
    Entry = 1,
    /// A protobuf `eraftpb::HardState`.
    HardState = 2,
    /// A snapshot exists at (term, index): two u64 LE.
    SnapshotMarker = 3,
    /// A snapshot from the leader was installed at (term, index) and replaced the whole log:
    /// entries written before this record are superseded. Payload as `SnapshotMarker`.
    SnapshotInstall = 4,
}

impl RecordType {
    fn from_byte(byte: u8) -> Option<RecordType> {
        match byte {
            1 => Some(RecordType::Entry),
            2 => Some(RecordType::HardState),
            3 => Some(RecordType::SnapshotMarker),
            4 => Some(RecordType::SnapshotInstall),
            _ => None,
        }
    }
}

/// Bytes a record with a payload of `payload_len` bytes takes on disk, header and padding included.
pub(crate) fn record_len(payload_len: u64) -> u64 {
    HEADER_BYTES + payload_len.div_ceil(RECORD_ALIGN) * RECORD_ALIGN
}

/// The CRC a record of this type and payload carries when it follows a record whose CRC was
/// `prev_crc`.
pub(crate) fn record_crc(prev_crc: u32, kind: u8, payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&prev_crc.to_le_bytes());
    let crc = crc32c::crc32c_append(crc, &[kind]);
    crc32c::crc32c_append(crc, payload)
}

/// A record about to be written, borrowing its contents from the caller.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RecordRef<'a> {
    Entry(&'a Entry),
    HardState(&'a HardState),
    SnapshotMarker { term: u64, index: u64 },
    SnapshotInstall { term: u64, index: u64 },
}

impl RecordRef<'_> {
    pub(crate) fn kind(&self) -> RecordType {
        match self {
            RecordRef::Entry(_) => RecordType::Entry,
            RecordRef::HardState(_) => RecordType::HardState,
            RecordRef::SnapshotMarker { .. } => RecordType::SnapshotMarker,
            RecordRef::SnapshotInstall { .. } => RecordType::SnapshotInstall,
        }
    }

    /// Length of the payload this record will carry.
    pub(crate) fn payload_len(&self) -> u64 {
        match self {
            RecordRef::Entry(entry) => u64::from(entry.compute_size()),
            RecordRef::HardState(hard_state) => u64::from(hard_state.compute_size()),
            RecordRef::SnapshotMarker { .. } | RecordRef::SnapshotInstall { .. } => {
                SNAPSHOT_MARKER_PAYLOAD_BYTES as u64
            }
        }
    }

    /// Bytes this record takes on disk.
    pub(crate) fn encoded_len(&self) -> u64 {
        record_len(self.payload_len())
    }

    /// Appends the framed record to `buf` and returns its CRC.
    ///
    /// `buf` must end at a record boundary (its length a multiple of [`RECORD_ALIGN`]).
    pub(crate) fn encode(&self, buf: &mut Vec<u8>, prev_crc: u32) -> Result<u32, String> {
        debug_assert!(
            (buf.len() as u64).is_multiple_of(RECORD_ALIGN),
            "records start aligned"
        );
        let start = buf.len();
        buf.extend_from_slice(&[0u8; HEADER_BYTES as usize]);
        let written = match self {
            RecordRef::Entry(entry) => {
                debug_assert!(entry.index > 0, "raft entries start at index 1");
                entry.write_to_vec(buf)
            }
            RecordRef::HardState(hard_state) => hard_state.write_to_vec(buf),
            RecordRef::SnapshotMarker { term, index }
            | RecordRef::SnapshotInstall { term, index } => {
                debug_assert!(*index > 0, "a snapshot marker names a real index");
                buf.extend_from_slice(&term.to_le_bytes());
                buf.extend_from_slice(&index.to_le_bytes());
                Ok(())
            }
        };
        if let Err(e) = written {
            buf.truncate(start);
            return Err(format!("cannot encode {:?} record: {e}", self.kind()));
        }
        let payload_start = start + HEADER_BYTES as usize;
        let payload_len = (buf.len() - payload_start) as u64;
        if payload_len > MAX_RECORD_PAYLOAD_BYTES {
            buf.truncate(start);
            return Err(format!(
                "{:?} payload of {payload_len} bytes exceeds the limit of {MAX_RECORD_PAYLOAD_BYTES}",
                self.kind()
            ));
        }
        debug_assert_eq!(
            payload_len,
            self.payload_len(),
            "payload_len predicts encode"
        );
        let kind = self.kind() as u8;
        let crc = record_crc(prev_crc, kind, &buf[payload_start..]);
        buf.resize(start + record_len(payload_len) as usize, 0);
        let header = &mut buf[start..payload_start];
        header[0..4].copy_from_slice(&(payload_len as u32).to_le_bytes());
        header[4] = kind;
        header[8..12].copy_from_slice(&prev_crc.to_le_bytes());
        header[12..16].copy_from_slice(&crc.to_le_bytes());
        Ok(crc)
    }
}

/// A record read back from disk, its payload checked and decoded.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Record {
    Entry(Entry),
    HardState(HardState),
    SnapshotMarker { term: u64, index: u64 },
    SnapshotInstall { term: u64, index: u64 },
}

/// A record whose framing and CRC are valid; the payload is not decoded yet.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawRecord<'a> {
    pub(crate) kind: RecordType,
    pub(crate) prev_crc: u32,
    pub(crate) crc: u32,
    pub(crate) payload: &'a [u8],
    /// Bytes the record takes on disk; the next record starts this far after this one.
    pub(crate) len: u64,
}

impl RawRecord<'_> {
    /// Decodes and checks the payload.
    pub(crate) fn decode(&self) -> Result<Record, String> {
        match self.kind {
            RecordType::Entry => {
                let entry = Entry::parse_from_bytes(self.payload)
                    .map_err(|e| format!("entry record does not decode: {e}"))?;
                if entry.index == 0 {
                    return Err("entry record with index 0".to_string());
                }
                Ok(Record::Entry(entry))
            }
            RecordType::HardState => HardState::parse_from_bytes(self.payload)
                .map(Record::HardState)
                .map_err(|e| format!("hard state record does not decode: {e}")),
            RecordType::SnapshotMarker | RecordType::SnapshotInstall => {
                let bytes: &[u8; SNAPSHOT_MARKER_PAYLOAD_BYTES] =
                    self.payload.try_into().map_err(|_| {
                        format!(
                            "snapshot marker payload is {} bytes, not {SNAPSHOT_MARKER_PAYLOAD_BYTES}",
                            self.payload.len()
                        )
                    })?;
                let (term, index) = bytes.split_at(8);
                let term = u64::from_le_bytes(term.try_into().unwrap_or_default());
                let index = u64::from_le_bytes(index.try_into().unwrap_or_default());
                if index == 0 {
                    return Err("snapshot marker with index 0".to_string());
                }
                Ok(if self.kind == RecordType::SnapshotInstall {
                    Record::SnapshotInstall { term, index }
                } else {
                    Record::SnapshotMarker { term, index }
                })
            }
        }
    }
}

/// What sits at one offset of a segment.
#[derive(Debug)]
pub(crate) enum Decoded<'a> {
    /// A self-consistent record (valid header, length and CRC over its own `prev_crc`).
    Record(RawRecord<'a>),
    /// An all-zero header, or fewer than a header's bytes left and all of them zero.
    End,
    /// Anything else; the reason says what is wrong.
    Bad(String),
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

/// Decodes the record at `offset` of `segment` (the whole segment file).
pub(crate) fn decode_at(segment: &[u8], offset: u64) -> Decoded<'_> {
    debug_assert!(offset.is_multiple_of(RECORD_ALIGN), "records start aligned");
    let Ok(start) = usize::try_from(offset) else {
        return Decoded::Bad("offset beyond addressable memory".to_string());
    };
    if start >= segment.len() {
        return Decoded::End;
    }
    let rest = &segment[start..];
    if (rest.len() as u64) < HEADER_BYTES {
        return if rest.iter().all(|b| *b == 0) {
            Decoded::End
        } else {
            Decoded::Bad(format!("short header: only {} bytes left", rest.len()))
        };
    }
    let header = &rest[..HEADER_BYTES as usize];
    if header.iter().all(|b| *b == 0) {
        return Decoded::End;
    }
    let payload_len = u64::from(read_u32(header, 0));
    let kind_byte = header[4];
    if header[5..8] != [0, 0, 0] {
        return Decoded::Bad("non-zero reserved header bytes".to_string());
    }
    let Some(kind) = RecordType::from_byte(kind_byte) else {
        return Decoded::Bad(format!("unknown record type {kind_byte}"));
    };
    if payload_len > MAX_RECORD_PAYLOAD_BYTES {
        return Decoded::Bad(format!(
            "payload length {payload_len} exceeds the limit of {MAX_RECORD_PAYLOAD_BYTES}"
        ));
    }
    let len = record_len(payload_len);
    if len > rest.len() as u64 {
        return Decoded::Bad(format!(
            "record of {len} bytes runs past the end of the segment ({} bytes left)",
            rest.len()
        ));
    }
    let prev_crc = read_u32(header, 8);
    let crc = read_u32(header, 12);
    let payload = &rest[HEADER_BYTES as usize..(HEADER_BYTES + payload_len) as usize];
    let actual = record_crc(prev_crc, kind_byte, payload);
    if actual != crc {
        return Decoded::Bad(format!(
            "crc mismatch: header says {crc:#010x}, contents give {actual:#010x}"
        ));
    }
    Decoded::Record(RawRecord {
        kind,
        prev_crc,
        crc,
        payload,
        len,
    })
}

/// The first aligned offset in `from..=to` holding a self-consistent record, if any.
pub(crate) fn find_valid_record(segment: &[u8], from: u64, to: u64) -> Option<u64> {
    debug_assert!(from.is_multiple_of(RECORD_ALIGN), "scan starts aligned");
    (from..=to)
        .step_by(RECORD_ALIGN as usize)
        .find(|offset| matches!(decode_at(segment, *offset), Decoded::Record(_)))
}

/// The offset of the last non-zero byte at or after `from`, if any.
pub(crate) fn last_nonzero(segment: &[u8], from: u64) -> Option<u64> {
    let start = usize::try_from(from).ok()?.min(segment.len());
    segment[start..]
        .iter()
        .rposition(|b| *b != 0)
        .map(|at| from + at as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, data: &[u8]) -> Entry {
        Entry {
            term: 3,
            index,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    #[test]
    fn encoded_record_decodes_to_the_same_contents_and_crc() {
        let written = entry(7, b"hello");
        let mut buf = Vec::new();
        let crc = RecordRef::Entry(&written)
            .encode(&mut buf, 0xdead_beef)
            .unwrap();
        assert_eq!(buf.len() as u64, RecordRef::Entry(&written).encoded_len());
        assert!((buf.len() as u64).is_multiple_of(RECORD_ALIGN));
        let Decoded::Record(raw) = decode_at(&buf, 0) else {
            panic!("record does not decode")
        };
        assert_eq!(
            (raw.prev_crc, raw.crc, raw.len),
            (0xdead_beef, crc, buf.len() as u64)
        );
        assert_eq!(raw.decode().unwrap(), Record::Entry(written));
    }

    #[test]
    fn snapshot_marker_round_trips_and_zero_index_is_rejected() {
        let mut buf = Vec::new();
        RecordRef::SnapshotMarker { term: 4, index: 99 }
            .encode(&mut buf, 1)
            .unwrap();
        let Decoded::Record(raw) = decode_at(&buf, 0) else {
            panic!("marker does not decode")
        };
        assert_eq!(
            raw.decode().unwrap(),
            Record::SnapshotMarker { term: 4, index: 99 }
        );
        let zero = RawRecord {
            payload: &[0u8; 16],
            ..raw
        };
        assert!(zero.decode().is_err());
    }

    #[test]
    fn every_single_bit_flip_in_header_or_payload_makes_the_record_bad() {
        let mut buf = Vec::new();
        RecordRef::Entry(&entry(1, b"payload bytes"))
            .encode(&mut buf, 5)
            .unwrap();
        let used =
            (HEADER_BYTES + RecordRef::Entry(&entry(1, b"payload bytes")).payload_len()) as usize;
        for at in 0..used {
            for bit in 0..8 {
                let mut copy = buf.clone();
                copy[at] ^= 1 << bit;
                assert!(
                    !matches!(decode_at(&copy, 0), Decoded::Record(_)),
                    "flip of bit {bit} at byte {at} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn zero_header_is_end_and_short_garbage_is_bad() {
        assert!(matches!(decode_at(&[0u8; 32], 0), Decoded::End));
        assert!(matches!(decode_at(&[0u8; 8], 0), Decoded::End));
        assert!(matches!(
            decode_at(&[0, 0, 1, 0, 0, 0, 0, 0], 0),
            Decoded::Bad(_)
        ));
        let mut huge = [0u8; 32];
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        huge[4] = RecordType::Entry as u8;
        assert!(matches!(decode_at(&huge, 0), Decoded::Bad(_)));
    }

    #[test]
    fn find_valid_record_skips_garbage_and_last_nonzero_finds_the_end() {
        let mut segment = vec![0u8; 64];
        segment[3] = 0xff;
        let mut record = Vec::new();
        RecordRef::SnapshotMarker { term: 1, index: 2 }
            .encode(&mut record, 0)
            .unwrap();
        segment[16..16 + record.len()].copy_from_slice(&record);
        assert_eq!(find_valid_record(&segment, 0, 56), Some(16));
        assert_eq!(find_valid_record(&segment, 24, 56), None);
        let record_last = record.iter().rposition(|b| *b != 0).unwrap() as u64;
        assert_eq!(last_nonzero(&segment, 0), Some(16 + record_last));
        assert_eq!(last_nonzero(&segment, 8), Some(16 + record_last));
        assert_eq!(last_nonzero(&[0u8; 8], 0), None);
    }
}
