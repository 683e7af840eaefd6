//! The files that carry a raft snapshot's state: the store's image (`mvcc::write_image`) at
//! one index, `<snap dir>/<index:016x>.image`.
//!
//! A snapshot that raft sends no longer holds the state itself: its data is a descriptor
//! (`QKVIMG01`, the image's length and CRC32C), and the image travels beside it, a chunk at a
//! time (`transfer`), from the leader's file to the follower's. Neither side holds more of it
//! in memory than a chunk, whatever the store's size. The leader writes an image when raft asks
//! for one; the follower receives it into `<index>.image.part` and renames it once whole and
//! checked. An image is removed once the backend holds its state durably.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::io::{Disk, DiskFile};

const DESCRIPTOR_MAGIC: &[u8; 8] = b"QKVIMG01";
const DESCRIPTOR_BYTES: usize = 8 + 8 + 4;
const IMAGE_SUFFIX: &str = ".image";
const PART_SUFFIX: &str = ".image.part";
/// Writes to an image file are buffered up to this many bytes...
const WRITE_BUFFER_BYTES: usize = 1 << 20;
/// ...and synced every this many, so that the final sync does not hold the disk for long.
const SYNC_EVERY_BYTES: u64 = 64 << 20;
/// Reads of an image file, a buffer at a time.
const READ_BUFFER_BYTES: usize = 1 << 20;

/// What a snapshot's data says of its image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageRef {
    pub len: u64,
    pub crc: u32,
}

impl ImageRef {
    /// The snapshot data that names this image.
    pub fn descriptor(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(DESCRIPTOR_BYTES);
        out.extend_from_slice(DESCRIPTOR_MAGIC);
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.crc.to_le_bytes());
        out
    }

    /// The image a snapshot's data names; `None` when the data is not a descriptor (an empty
    /// snapshot, or one that carries its state inline).
    pub fn parse(data: &[u8]) -> Option<ImageRef> {
        if data.len() != DESCRIPTOR_BYTES || !data.starts_with(DESCRIPTOR_MAGIC) {
            return None;
        }
        let len = u64::from_le_bytes(data[8..16].try_into().ok()?);
        let crc = u32::from_le_bytes(data[16..20].try_into().ok()?);
        Some(ImageRef { len, crc })
    }
}

/// The image files of one member.
pub struct ImageStore {
    disk: Arc<dyn Disk>,
    dir: PathBuf,
}

fn index_of(name: &str, suffix: &str) -> Option<u64> {
    let stem = name.strip_suffix(suffix)?;
    (stem.len() == 16)
        .then(|| u64::from_str_radix(stem, 16).ok())
        .flatten()
}

impl ImageStore {
    pub fn new(disk: Arc<dyn Disk>, dir: &Path) -> Arc<ImageStore> {
        Arc::new(ImageStore {
            disk,
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, index: u64) -> PathBuf {
        self.dir.join(format!("{index:016x}{IMAGE_SUFFIX}"))
    }

    fn part_path(&self, index: u64) -> PathBuf {
        self.dir.join(format!("{index:016x}{PART_SUFFIX}"))
    }

    /// The indexes of the whole images on disk, ascending.
    fn indexes(&self) -> io::Result<Vec<u64>> {
        let mut indexes: Vec<u64> = self
            .disk
            .list(&self.dir)?
            .iter()
            .filter_map(|name| index_of(name, IMAGE_SUFFIX))
            .collect();
        indexes.sort_unstable();
        Ok(indexes)
    }

    /// Writes the image at `index` with `fill` (which writes the image to the writer it is
    /// given): into a part file, synced, then renamed into place. Images older than it are
    /// removed (a follower that needs one is sent this one instead).
    pub fn write(
        &self,
        index: u64,
        fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> io::Result<ImageRef> {
        let part = self.part_path(index);
        let mut writer = ImageWriter::create(self.disk.as_ref(), &part)?;
        fill(&mut writer)?;
        let image = writer.finish()?;
        self.disk.rename(&part, &self.path(index))?;
        self.disk.sync_dir(&self.dir)?;
        for older in self.indexes()?.into_iter().filter(|i| *i < index) {
            self.remove(older);
        }
        Ok(image)
    }

    /// Starts receiving the image at `index` (replacing any part of it received before).
    pub fn receive(&self, index: u64) -> io::Result<ImageWriter> {
        ImageWriter::create(self.disk.as_ref(), &self.part_path(index))
    }

    /// The image at `index` is received whole and checked against `expected`: synced, and
    /// renamed into place. `Err` when it is not what the sender said.
    pub fn received(
        &self,
        index: u64,
        writer: ImageWriter,
        expected: ImageRef,
    ) -> io::Result<ImageRef> {
        let image = writer.finish()?;
        let part = self.part_path(index);
        if image != expected {
            let _ = self.disk.remove(&part);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("snapshot image {index}: received {image:?}, the sender said {expected:?}"),
            ));
        }
        self.disk.rename(&part, &self.path(index))?;
        self.disk.sync_dir(&self.dir)?;
        Ok(image)
    }

    /// Opens the image at `index`, first checking the whole file against `image` (a damaged or
    /// missing image is an error, before anything reads it).
    pub fn open(&self, index: u64, image: ImageRef) -> io::Result<ImageFileReader> {
        let path = self.path(index);
        let file = self.disk.open(&path, false).map_err(|e| {
            io::Error::new(e.kind(), format!("snapshot image {}: {e}", path.display()))
        })?;
        let mut reader = ImageFileReader::new(file, image.len);
        let mut crc = 0u32;
        let mut buf = vec![0u8; READ_BUFFER_BYTES];
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            crc = crc32c::crc32c_append(crc, &buf[..n]);
        }
        let found = ImageRef {
            len: reader.offset,
            crc,
        };
        if found != image {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "snapshot image {}: found {found:?}, the snapshot says {image:?}",
                    path.display()
                ),
            ));
        }
        reader.offset = 0;
        Ok(reader)
    }

    /// Opens the image at `index` to send it, unchecked (the receiver checks it).
    pub fn open_to_send(&self, index: u64) -> io::Result<Box<dyn DiskFile>> {
        self.disk.open(&self.path(index), false)
    }

    /// Removes every image (and part of one) at or below `index`: the backend holds that
    /// state durably.
    pub fn remove_through(&self, index: u64) {
        let Ok(names) = self.disk.list(&self.dir) else {
            return;
        };
        for name in names {
            let found = index_of(&name, IMAGE_SUFFIX).or_else(|| index_of(&name, PART_SUFFIX));
            if found.is_some_and(|i| i <= index) {
                let _ = self.disk.remove(&self.dir.join(name));
            }
        }
        let _ = self.disk.sync_dir(&self.dir);
    }

    /// Removes the parts of images a transfer left unfinished (at start: no transfer runs).
    pub fn remove_parts(&self) {
        let Ok(names) = self.disk.list(&self.dir) else {
            return;
        };
        for name in names {
            if index_of(&name, PART_SUFFIX).is_some() {
                let _ = self.disk.remove(&self.dir.join(name));
            }
        }
    }

    fn remove(&self, index: u64) {
        let path = self.path(index);
        if let Err(e) = self.disk.remove(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove an old snapshot image");
        }
    }
}

/// Writes an image file a buffer at a time, keeping its length and CRC32C.
pub struct ImageWriter {
    file: Box<dyn DiskFile>,
    buffer: Vec<u8>,
    written: u64,
    synced: u64,
    crc: u32,
}

impl ImageWriter {
    fn create(disk: &dyn Disk, path: &Path) -> io::Result<ImageWriter> {
        let mut file = disk.open(path, true)?;
        file.set_len(0)?;
        Ok(ImageWriter {
            file,
            buffer: Vec::with_capacity(WRITE_BUFFER_BYTES),
            written: 0,
            synced: 0,
            crc: 0,
        })
    }

    /// Bytes taken and not yet written to the file.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Bytes taken so far.
    pub fn len(&self) -> u64 {
        self.written + self.buffer.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn write_buffer(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        self.file.write_at(self.written, &self.buffer)?;
        self.written += self.buffer.len() as u64;
        self.buffer.clear();
        if self.written - self.synced >= SYNC_EVERY_BYTES {
            self.file.sync_data()?;
            self.synced = self.written;
        }
        Ok(())
    }

    /// Writes what is buffered and syncs it; the image's length and CRC.
    fn finish(mut self) -> io::Result<ImageRef> {
        self.write_buffer()?;
        self.file.sync_data()?;
        Ok(ImageRef {
            len: self.written,
            crc: self.crc,
        })
    }
}

impl Write for ImageWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.crc = crc32c::crc32c_append(self.crc, data);
        if self.buffer.len() + data.len() > WRITE_BUFFER_BYTES {
            self.write_buffer()?;
        }
        if data.len() >= WRITE_BUFFER_BYTES {
            self.file.write_at(self.written, data)?;
            self.written += data.len() as u64;
        } else {
            self.buffer.extend_from_slice(data);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write_buffer()
    }
}

/// Reads an image file from its start, up to its length.
pub struct ImageFileReader {
    file: Box<dyn DiskFile>,
    len: u64,
    offset: u64,
}

impl ImageFileReader {
    fn new(file: Box<dyn DiskFile>, len: u64) -> Self {
        ImageFileReader {
            file,
            len,
            offset: 0,
        }
    }
}

impl Read for ImageFileReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (self.len - self.offset).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(self.offset, &mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "snapshot image shorter than its length",
            ));
        }
        self.offset += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::StdDisk;

    #[test]
    fn a_descriptor_round_trips_and_other_data_is_not_one() {
        let image = ImageRef {
            len: 5 << 30,
            crc: 0xdead_beef,
        };
        assert_eq!(ImageRef::parse(&image.descriptor()), Some(image));
        assert_eq!(ImageRef::parse(b""), None);
        assert_eq!(ImageRef::parse(b"QKVDB1 and an inline image"), None);
    }

    #[test]
    fn an_image_larger_than_every_buffer_reads_back_whole_and_checked() {
        let dir = std::env::temp_dir().join(format!("qkv-image-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let store = ImageStore::new(StdDisk::shared(), &dir);
        // 3.5 write buffers, written in odd pieces, one of them larger than a buffer.
        let data: Vec<u8> = (0..(7 * WRITE_BUFFER_BYTES / 2))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let image = store
            .write(9, |out| {
                out.write_all(&data[..1000])?;
                out.write_all(&data[1000..1000 + 2 * WRITE_BUFFER_BYTES])?;
                out.write_all(&data[1000 + 2 * WRITE_BUFFER_BYTES..])
            })
            .expect("write");
        assert_eq!(image.len, data.len() as u64);
        assert_eq!(image.crc, crc32c::crc32c(&data));
        let mut back = Vec::new();
        store
            .open(9, image)
            .expect("open")
            .read_to_end(&mut back)
            .expect("read");
        assert!(back == data, "the image reads back as written");
        // A damaged byte is found before anything is read.
        let mut raw = std::fs::read(store.path(9)).expect("raw");
        raw[WRITE_BUFFER_BYTES + 3] ^= 1;
        std::fs::write(store.path(9), raw).expect("damage");
        let err = store.open(9, image).err().expect("damage found");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // A newer image replaces it; removing through an index removes it.
        store.write(12, |out| out.write_all(b"x")).expect("write");
        assert!(!store.path(9).exists(), "older images go");
        store.remove_through(12);
        assert!(!store.path(12).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
