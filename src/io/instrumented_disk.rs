//! A test adapter: `StdDisk` that logs the calls crash safety rests on (file creation, each
//! file's fdatasync, removal, directory syncs) and can be made to fail `sync_data`.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{Disk, DiskFile, StdDisk};

/// `StdDisk` that logs the calls that matter for crash safety and can fail `sync_data`.
#[derive(Default)]
pub struct InstrumentedDisk {
    pub fail_sync: Arc<AtomicBool>,
    /// When not 0: `allocate` of more bytes than this fails with ENOSPC.
    pub no_space_over: Arc<AtomicU64>,
    events: Arc<Mutex<Vec<String>>>,
    writes: Arc<Mutex<Vec<Write>>>,
}

/// One `write_at`: the file's name, the offset, the length and whether every byte was zero.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    pub file: String,
    pub offset: u64,
    pub len: u64,
    pub zeros: bool,
}

impl InstrumentedDisk {
    fn log(events: &Mutex<Vec<String>>, event: String) {
        events.lock().unwrap().push(event);
    }

    /// What happened since the last call, in order: `create NAME`, `sync NAME`,
    /// `remove NAME`, `sync dir`.
    pub fn take_events(&self) -> Vec<String> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }

    /// Every `write_at` since the last call, in order.
    pub fn take_writes(&self) -> Vec<Write> {
        std::mem::take(&mut *self.writes.lock().unwrap())
    }
}

struct InstrumentedFile {
    inner: Box<dyn DiskFile>,
    name: String,
    fail_sync: Arc<AtomicBool>,
    no_space_over: Arc<AtomicU64>,
    events: Arc<Mutex<Vec<String>>>,
    writes: Arc<Mutex<Vec<Write>>>,
}

/// The last component of `path`, as the events name files.
pub fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

impl DiskFile for InstrumentedFile {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.writes.lock().unwrap().push(Write {
            file: self.name.clone(),
            offset,
            len: data.len() as u64,
            zeros: data.iter().all(|&b| b == 0),
        });
        self.inner.write_at(offset, data)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read_at(offset, buf)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        InstrumentedDisk::log(&self.events, format!("sync {}", self.name));
        if self.fail_sync.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected fdatasync failure"));
        }
        self.inner.sync_data()
    }
    fn allocate(&mut self, len: u64) -> io::Result<()> {
        let limit = self.no_space_over.load(Ordering::SeqCst);
        if limit != 0 && len > limit {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.inner.allocate(len)
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
}

impl Disk for InstrumentedDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        StdDisk.create_dir_all(dir)
    }
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn DiskFile>> {
        if create {
            Self::log(&self.events, format!("create {}", file_name(path)));
        }
        Ok(Box::new(InstrumentedFile {
            inner: StdDisk.open(path, create)?,
            name: file_name(path),
            fail_sync: self.fail_sync.clone(),
            no_space_over: self.no_space_over.clone(),
            events: self.events.clone(),
            writes: self.writes.clone(),
        }))
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        StdDisk.list(dir)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        StdDisk.rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        Self::log(&self.events, format!("remove {}", file_name(path)));
        StdDisk.remove(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        Self::log(&self.events, "sync dir".to_string());
        StdDisk.sync_dir(dir)
    }
    fn exists(&self, path: &Path) -> bool {
        StdDisk.exists(path)
    }
}
