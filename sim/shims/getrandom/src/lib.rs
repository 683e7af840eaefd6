//! The part of getrandom 0.2's API that the simulator's dependencies use, over libc's
//! `getrandom(3)` (deterministic under madsim). Never part of a production build.

use core::mem::MaybeUninit;
use core::num::NonZeroU32;

/// An error code, as getrandom 0.2 reports it (an OS errno, or an internal code).
#[derive(Copy, Clone, Eq, PartialEq)]
pub struct Error(NonZeroU32);

const fn internal(n: u32) -> Error {
    match NonZeroU32::new(Error::INTERNAL_START + n) {
        Some(code) => Error(code),
        None => panic!("internal error codes are non-zero"),
    }
}

impl Error {
    pub const UNSUPPORTED: Error = internal(0);
    pub const ERRNO_NOT_POSITIVE: Error = internal(1);
    pub const UNEXPECTED: Error = internal(2);
    pub const INTERNAL_START: u32 = 1 << 31;
    pub const CUSTOM_START: u32 = (1 << 31) + (1 << 30);

    pub fn raw_os_error(self) -> Option<i32> {
        if self.0.get() < Self::INTERNAL_START {
            Some(self.0.get() as i32)
        } else {
            None
        }
    }

    pub const fn code(self) -> NonZeroU32 {
        self.0
    }
}

impl core::fmt::Debug for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Error {{ code: {} }}", self.0)
    }
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.raw_os_error() {
            Some(errno) => write!(f, "getrandom: OS error {errno}"),
            None => write!(f, "getrandom: internal error {}", self.0),
        }
    }
}

impl From<NonZeroU32> for Error {
    fn from(code: NonZeroU32) -> Self {
        Error(code)
    }
}

impl std::error::Error for Error {}

impl From<Error> for std::io::Error {
    fn from(err: Error) -> Self {
        match err.raw_os_error() {
            Some(errno) => std::io::Error::from_raw_os_error(errno),
            None => std::io::Error::other(err),
        }
    }
}

/// Fills `dest` with random bytes.
pub fn getrandom(dest: &mut [u8]) -> Result<(), Error> {
    let mut done = 0;
    while done < dest.len() {
        let rest = &mut dest[done..];
        // SAFETY: the pointer and length describe `rest`, which is valid for writes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            if errno == libc::EINTR {
                continue;
            }
            return Err(u32::try_from(errno)
                .ok()
                .and_then(NonZeroU32::new)
                .map_or(Error::ERRNO_NOT_POSITIVE, Error));
        }
        done += n as usize;
    }
    Ok(())
}

/// Fills `dest` with random bytes and returns it initialized.
pub fn getrandom_uninit(dest: &mut [MaybeUninit<u8>]) -> Result<&mut [u8], Error> {
    for byte in dest.iter_mut() {
        byte.write(0);
    }
    // SAFETY: every byte was just initialized.
    let bytes = unsafe { &mut *(dest as *mut [MaybeUninit<u8>] as *mut [u8]) };
    getrandom(bytes)?;
    Ok(bytes)
}
