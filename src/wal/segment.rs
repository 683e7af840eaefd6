//! Segment files: their names, reading one back, and telling a torn tail from corruption.
//!
//! The log is split into preallocated segments so that old entries can be released by deleting
//! whole files. Replay walks a segment record by record; where the records stop, this module
//! decides whether what follows is the clean end, a torn write that may be dropped (only at the
//! end of the last segment), or corruption that must stop the node.

use std::path::{Path, PathBuf};

use crate::io::{Disk, DiskFile};

use super::record::{self, Decoded, Record, RECORD_ALIGN};
use super::replay::LogBuilder;
use super::{io_error, TailRepair, WalError, MAX_SEGMENT_BYTES, ZERO_CHUNK_BYTES};

/// File name suffix of a segment.
const SEGMENT_SUFFIX: &str = ".wal";
/// Hex digits in each number of a segment name.
const NAME_DIGITS: usize = 16;
/// Bytes read from a file per `read_at` call.
const READ_CHUNK_BYTES: usize = 1 << 20;

/// A segment's identity, as encoded in its file name `<seq:016x>-<first_index:016x>.wal`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct SegmentName {
    /// Position in the log; consecutive segments have consecutive numbers.
    pub(crate) seq: u64,
    /// The index the first entry written to the segment had (or was expected to have).
    /// Informational: after a conflict a segment may hold lower indices.
    pub(crate) first_index: u64,
}

impl SegmentName {
    pub(crate) fn file_name(&self) -> String {
        format!(
            "{:016x}-{:016x}{SEGMENT_SUFFIX}",
            self.seq, self.first_index
        )
    }

    /// Parses a file name; `None` when it is not a segment name.
    pub(crate) fn parse(name: &str) -> Option<SegmentName> {
        let stem = name.strip_suffix(SEGMENT_SUFFIX)?;
        let (seq, first_index) = stem.split_once('-')?;
        if seq.len() != NAME_DIGITS || first_index.len() != NAME_DIGITS {
            return None;
        }
        let hex = |s: &str| {
            s.bytes().all(|b| b.is_ascii_hexdigit()).then_some(())?;
            u64::from_str_radix(s, 16).ok()
        };
        Some(SegmentName {
            seq: hex(seq)?,
            first_index: hex(first_index)?,
        })
    }
}

/// Reads a whole file, refusing files longer than `max_bytes`.
pub(crate) fn read_bounded(
    file: &dyn DiskFile,
    path: &Path,
    max_bytes: u64,
) -> Result<Vec<u8>, WalError> {
    let len = file.len().map_err(io_error("stat", path))?;
    if len > max_bytes {
        return Err(WalError::Corrupt {
            file: path.to_path_buf(),
            offset: 0,
            reason: format!("file of {len} bytes exceeds the limit of {max_bytes}"),
        });
    }
    let len = usize::try_from(len).map_err(|_| WalError::Corrupt {
        file: path.to_path_buf(),
        offset: 0,
        reason: "file larger than addressable memory".to_string(),
    })?;
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let end = len.min(done + READ_CHUNK_BYTES);
        let n = file
            .read_at(done as u64, &mut buf[done..end])
            .map_err(io_error("read", path))?;
        if n == 0 {
            buf.truncate(done);
            break;
        }
        done += n;
    }
    debug_assert!(buf.len() <= len, "never read more than the file's length");
    Ok(buf)
}

/// How the records of one segment ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Tail {
    /// Records stop at `end`; everything after it is zero.
    Clean { end: u64 },
    /// Records stop at `offset` and bytes up to `last_nonzero` (inclusive) are garbage from a
    /// torn write: no self-consistent record follows. Only reported for the last segment.
    Torn { offset: u64, last_nonzero: u64 },
}

/// The CRC chain carried across records and segments during replay.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Chain {
    /// The `prev_crc` the next record must carry; `None` accepts any (the first record of the
    /// oldest remaining segment, whose predecessor may have been released).
    pub(crate) expected_prev_crc: Option<u32>,
}

/// Walks the records of one segment (`bytes`, the whole file at `path`), checking each record
/// and the chain, and handing each decoded record to `visit`.
///
/// `is_last` selects the tail rule: in the last segment garbage with no valid record after it is
/// a torn tail; anywhere else any bad or trailing data is corruption.
pub(crate) fn scan(
    path: &Path,
    bytes: &[u8],
    chain: &mut Chain,
    is_last: bool,
    mut visit: impl FnMut(Record),
) -> Result<Tail, WalError> {
    let corrupt = |offset: u64, reason: String| WalError::Corrupt {
        file: path.to_path_buf(),
        offset,
        reason,
    };
    let mut offset = 0u64;
    let why_stopped = loop {
        match record::decode_at(bytes, offset) {
            Decoded::Record(raw) => {
                if let Some(expected) = chain.expected_prev_crc {
                    if raw.prev_crc != expected {
                        return Err(corrupt(
                            offset,
                            format!(
                                "broken chain: record follows crc {:#010x} but the previous record's crc is {expected:#010x}",
                                raw.prev_crc
                            ),
                        ));
                    }
                }
                let decoded = raw.decode().map_err(|reason| corrupt(offset, reason))?;
                visit(decoded);
                chain.expected_prev_crc = Some(raw.crc);
                debug_assert!(
                    raw.len.is_multiple_of(RECORD_ALIGN),
                    "records keep alignment"
                );
                offset += raw.len;
            }
            Decoded::End => break None,
            Decoded::Bad(reason) => break Some(reason),
        }
    };
    let Some(last_nonzero) = record::last_nonzero(bytes, offset) else {
        debug_assert!(why_stopped.is_none(), "a bad record has non-zero bytes");
        return Ok(Tail::Clean { end: offset });
    };
    let why = why_stopped.unwrap_or_else(|| "zeroed header followed by non-zero bytes".into());
    if let Some(valid) = record::find_valid_record(bytes, offset + RECORD_ALIGN, last_nonzero) {
        return Err(corrupt(
            offset,
            format!("{why}; a valid record follows at offset {valid}"),
        ));
    }
    if !is_last {
        return Err(corrupt(
            offset,
            format!("{why} in a segment that is not the last"),
        ));
    }
    debug_assert!(last_nonzero >= offset);
    Ok(Tail::Torn {
        offset,
        last_nonzero,
    })
}

/// Creates a new segment file of `capacity` bytes and makes it and its directory entry durable.
pub(crate) fn create(
    disk: &dyn Disk,
    dir: &Path,
    name: SegmentName,
    capacity: u64,
) -> Result<(PathBuf, Box<dyn DiskFile>), WalError> {
    debug_assert!(
        capacity.is_multiple_of(RECORD_ALIGN),
        "segments hold whole records"
    );
    let path = dir.join(name.file_name());
    if disk.exists(&path) {
        return Err(WalError::Corrupt {
            file: path,
            offset: 0,
            reason: "a segment with this name already exists".to_string(),
        });
    }
    let mut file = disk.open(&path, true).map_err(io_error("create", &path))?;
    let made = file
        .allocate(capacity)
        .map_err(io_error("preallocate", &path))
        .and_then(|()| file.sync_data().map_err(io_error("fdatasync", &path)))
        .and_then(|()| disk.sync_dir(dir).map_err(io_error("fsync directory", dir)));
    if let Err(e) = made {
        // Nothing was written to it: a failed segment is not left behind to be found (empty,
        // or preallocated in part) by the next start.
        drop(file);
        if disk.remove(&path).is_ok() {
            let _ = disk.sync_dir(dir);
        }
        return Err(e);
    }
    Ok((path, file))
}

/// Whether `err` says the device is full.
pub(crate) fn is_no_space(err: &WalError) -> bool {
    matches!(err, WalError::Io { source, .. }
        if source.kind() == std::io::ErrorKind::StorageFull
            || source.raw_os_error() == Some(libc::ENOSPC))
}

/// [`create`] with `wanted` bytes, or, when the device has not that much room, with less (half
/// at each try) down to `needed`: a member on a nearly full disk goes on writing into what is
/// left instead of failing for want of a whole segment. Returns the capacity made.
pub(crate) fn create_fitting(
    disk: &dyn Disk,
    dir: &Path,
    name: SegmentName,
    wanted: u64,
    needed: u64,
) -> Result<(PathBuf, Box<dyn DiskFile>, u64), WalError> {
    let round = |n: u64| n.div_ceil(RECORD_ALIGN) * RECORD_ALIGN;
    let needed = round(needed);
    let mut capacity = round(wanted.max(needed));
    loop {
        match create(disk, dir, name, capacity) {
            Ok((path, file)) => {
                if capacity < wanted {
                    tracing::warn!(
                        file = %path.display(),
                        capacity,
                        wanted,
                        "wal: the disk is nearly full; a smaller segment than configured"
                    );
                }
                return Ok((path, file, capacity));
            }
            Err(e) if is_no_space(&e) && capacity > needed => {
                capacity = round((capacity / 2).max(needed));
            }
            Err(e) if is_no_space(&e) => {
                return Err(WalError::NoSpace {
                    file: dir.join(name.file_name()),
                    needed,
                })
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether the segment at `path` holds no record: empty, or zeros where its first record
/// would start (made by a start or a roll that failed before writing to it).
pub(crate) fn holds_no_record(disk: &dyn Disk, path: &Path) -> Result<bool, WalError> {
    let file = disk.open(path, false).map_err(io_error("open", path))?;
    let mut head = [0u8; RECORD_ALIGN as usize];
    let n = file.read_at(0, &mut head).map_err(io_error("read", path))?;
    Ok(head[..n].iter().all(|b| *b == 0))
}

/// A segment the log still holds.
#[derive(Debug)]
pub(crate) struct SegmentMeta {
    pub(crate) name: SegmentName,
    pub(crate) path: PathBuf,
    /// The highest entry index written to the segment, `None` when it holds no entry.
    pub(crate) max_entry_index: Option<u64>,
}

/// The segments in `dir`, oldest first; a hole in the sequence is corruption.
pub(crate) fn list(disk: &dyn Disk, dir: &Path) -> Result<Vec<SegmentName>, WalError> {
    let mut names: Vec<SegmentName> = disk
        .list(dir)
        .map_err(io_error("list", dir))?
        .iter()
        .filter_map(|name| SegmentName::parse(name))
        .collect();
    names.sort();
    for pair in names.windows(2) {
        if pair[1].seq != pair[0].seq + 1 {
            return Err(WalError::Corrupt {
                file: dir.join(pair[1].file_name()),
                offset: 0,
                reason: format!(
                    "segment {} follows segment {}: the segments between are missing",
                    pair[1].seq, pair[0].seq
                ),
            });
        }
    }
    Ok(names)
}

/// One segment read back during replay.
pub(crate) struct ScannedSegment {
    pub(crate) meta: SegmentMeta,
    pub(crate) file: Box<dyn DiskFile>,
    pub(crate) len: u64,
    pub(crate) tail: Tail,
}

/// Reads one segment and feeds its records, checked and chained, to `builder`.
pub(crate) fn read_and_scan(
    disk: &dyn Disk,
    dir: &Path,
    name: SegmentName,
    chain: &mut Chain,
    builder: &mut LogBuilder,
    is_last: bool,
) -> Result<ScannedSegment, WalError> {
    let path = dir.join(name.file_name());
    let file = disk.open(&path, false).map_err(io_error("open", &path))?;
    let bytes = read_bounded(file.as_ref(), &path, MAX_SEGMENT_BYTES)?;
    let mut max_entry_index = None;
    let tail = scan(&path, &bytes, chain, is_last, |record| {
        if let Record::Entry(entry) = &record {
            max_entry_index = max_entry_index.max(Some(entry.index));
        }
        builder.add(record);
    })?;
    Ok(ScannedSegment {
        meta: SegmentMeta {
            name,
            path,
            max_entry_index,
        },
        file,
        len: bytes.len() as u64,
        tail,
    })
}

/// Zeroes a torn write (`offset..=last_nonzero`) and makes that durable.
pub(crate) fn zero_torn_tail(
    file: &mut dyn DiskFile,
    path: &Path,
    offset: u64,
    last_nonzero: u64,
) -> Result<TailRepair, WalError> {
    debug_assert!(offset <= last_nonzero);
    let dropped_bytes = last_nonzero + 1 - offset;
    tracing::warn!(
        file = %path.display(),
        offset,
        dropped_bytes,
        "wal: dropping a torn write at the end of the last segment"
    );
    let zeros = vec![0u8; ZERO_CHUNK_BYTES.min(dropped_bytes) as usize];
    let mut at = offset;
    while at <= last_nonzero {
        let n = (last_nonzero + 1 - at).min(zeros.len() as u64);
        file.write_at(at, &zeros[..n as usize])
            .map_err(io_error("wipe the torn tail of", path))?;
        at += n;
    }
    file.sync_data().map_err(io_error("fdatasync", path))?;
    Ok(TailRepair {
        file: path.to_path_buf(),
        offset,
        dropped_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip_and_foreign_names_are_ignored() {
        let name = SegmentName {
            seq: 0x1f,
            first_index: 42,
        };
        assert_eq!(name.file_name(), "000000000000001f-000000000000002a.wal");
        assert_eq!(SegmentName::parse(&name.file_name()), Some(name));
        for foreign in [
            "000000000000001f-000000000000002a.wal.tmp",
            "1f-2a.wal",
            "000000000000001f_000000000000002a.wal",
            "+00000000000001f-000000000000002a.wal",
            "lock",
        ] {
            assert_eq!(SegmentName::parse(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn trailing_garbage_is_torn_only_in_the_last_segment() {
        let mut bytes = vec![0u8; 128];
        bytes[40] = 7;
        let path = Path::new("seg");
        let mut chain = Chain {
            expected_prev_crc: None,
        };
        let tail = scan(path, &bytes, &mut chain, true, |_| {}).unwrap();
        assert_eq!(
            tail,
            Tail::Torn {
                offset: 0,
                last_nonzero: 40
            }
        );
        let err = scan(path, &bytes, &mut chain, false, |_| {}).unwrap_err();
        assert!(matches!(err, WalError::Corrupt { offset: 0, .. }), "{err}");
    }
}
