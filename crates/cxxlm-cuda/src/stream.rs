//! Torch's CUDA streams and events between them, through `shim.cpp`: work enqueued on a
//! side stream runs beside the computation on the current one, and each waits for the
//! other only where it uses what the other made. Builds without the shim have none
//! ([`Stream::side`] is None) and everything runs on the one stream, in order.

#[cfg(cxxlm_cuda)]
mod ffi {
    use std::ffi::{c_char, c_int, c_void};
    use torch_sys::C_tensor;
    extern "C" {
        pub fn cxxlm_stream_current(device: c_int) -> *mut c_void;
        pub fn cxxlm_stream_from_pool(device: c_int) -> *mut c_void;
        pub fn cxxlm_stream_free(stream: *mut c_void);
        pub fn cxxlm_stream_make_current(stream: *mut c_void);
        pub fn cxxlm_event_record(
            stream: *mut c_void,
            timed: c_int,
            error: *mut c_char,
            len: usize,
        ) -> *mut c_void;
        pub fn cxxlm_event_seconds_between(
            start: *mut c_void,
            end: *mut c_void,
            error: *mut c_char,
            len: usize,
        ) -> f64;
        pub fn cxxlm_stream_wait(
            stream: *mut c_void,
            event: *mut c_void,
            error: *mut c_char,
            len: usize,
        ) -> c_int;
        pub fn cxxlm_event_free(event: *mut c_void);
        pub fn cxxlm_record_stream(t: *const C_tensor, stream: *mut c_void);
    }
}

use tch::Tensor;

/// A CUDA stream of torch's.
pub struct Stream {
    #[cfg(cxxlm_cuda)]
    stream: *mut std::ffi::c_void,
    #[cfg(cxxlm_cuda)]
    device: usize,
}

/// A point in a stream's work ([`Stream::record`]).
pub struct Event {
    #[cfg(cxxlm_cuda)]
    event: *mut std::ffi::c_void,
}

/// While it lives, what torch enqueues goes to the stream [`Stream::enter`]ed.
pub struct Entered {
    #[cfg(cxxlm_cuda)]
    previous: Stream,
}

impl Stream {
    /// Torch's current stream on CUDA device `device`; None without the shim.
    pub fn current(device: usize) -> Option<Stream> {
        #[cfg(cxxlm_cuda)]
        // SAFETY: the shim returns a heap copy of torch's stream handle, or null.
        return Stream::adopt(unsafe { ffi::cxxlm_stream_current(device as i32) }, device);
        #[cfg(not(cxxlm_cuda))]
        {
            let _ = device;
            None
        }
    }

    /// A stream of torch's pool on CUDA device `device`, to run work beside the current
    /// stream's; None without the shim.
    pub fn side(device: usize) -> Option<Stream> {
        #[cfg(cxxlm_cuda)]
        // SAFETY: as in `current`.
        return Stream::adopt(
            unsafe { ffi::cxxlm_stream_from_pool(device as i32) },
            device,
        );
        #[cfg(not(cxxlm_cuda))]
        {
            let _ = device;
            None
        }
    }

    #[cfg(cxxlm_cuda)]
    fn adopt(stream: *mut std::ffi::c_void, device: usize) -> Option<Stream> {
        (!stream.is_null()).then_some(Stream { stream, device })
    }

    /// Makes this stream torch's current one until the guard is dropped.
    pub fn enter(&self) -> Entered {
        #[cfg(cxxlm_cuda)]
        {
            let previous = Stream::current(self.device).expect("torch's current stream");
            // SAFETY: a live stream handle.
            unsafe { ffi::cxxlm_stream_make_current(self.stream) };
            Entered { previous }
        }
        #[cfg(not(cxxlm_cuda))]
        unreachable!("no stream exists without the shim")
    }

    /// The point this stream's work has reached so far (once enqueued).
    pub fn record(&self) -> Result<Event, String> {
        self.record_as(false)
    }

    /// [`Stream::record`], keeping when the device reaches the point
    /// ([`Event::seconds_since`]).
    pub fn record_timed(&self) -> Result<Event, String> {
        self.record_as(true)
    }

    fn record_as(&self, timed: bool) -> Result<Event, String> {
        #[cfg(cxxlm_cuda)]
        {
            let mut event = std::ptr::null_mut();
            // SAFETY: a live stream handle; the shim takes a buffer and its length for
            // the message.
            crate::call(|e, n| {
                event = unsafe { ffi::cxxlm_event_record(self.stream, timed as i32, e, n) };
                !event.is_null()
            })?;
            Ok(Event { event })
        }
        #[cfg(not(cxxlm_cuda))]
        {
            let _ = timed;
            unreachable!("no stream exists without the shim")
        }
    }

    /// Work enqueued on this stream from now on waits for `event`.
    pub fn wait(&self, event: &Event) -> Result<(), String> {
        #[cfg(cxxlm_cuda)]
        // SAFETY: a live stream and a live event; as in `record`.
        return crate::call(|e, n| unsafe {
            ffi::cxxlm_stream_wait(self.stream, event.event, e, n) == 0
        });
        #[cfg(not(cxxlm_cuda))]
        {
            let _ = event;
            unreachable!("no stream exists without the shim")
        }
    }

    /// Work enqueued on this stream from now on waits for what `other` holds now.
    pub fn wait_for(&self, other: &Stream) -> Result<(), String> {
        self.wait(&other.record()?)
    }

    /// `t`, made on another stream, is used on this one: torch's allocator must not hand
    /// its memory out again before the work this stream holds now has run.
    pub fn uses(&self, t: &Tensor) {
        #[cfg(cxxlm_cuda)]
        // SAFETY: a live tensor and a live stream handle.
        unsafe {
            ffi::cxxlm_record_stream(t.as_ptr(), self.stream)
        };
        #[cfg(not(cxxlm_cuda))]
        {
            let _ = t;
            unreachable!("no stream exists without the shim")
        }
    }
}

impl Event {
    /// Seconds on the device's clock from `start` to this event, both recorded timed and
    /// both reached.
    pub fn seconds_since(&self, start: &Event) -> Result<f64, String> {
        #[cfg(cxxlm_cuda)]
        {
            let mut seconds = 0.0;
            // SAFETY: two live events; as in `record`.
            crate::call(|e, n| {
                seconds =
                    unsafe { ffi::cxxlm_event_seconds_between(start.event, self.event, e, n) };
                seconds >= 0.0
            })?;
            Ok(seconds)
        }
        #[cfg(not(cxxlm_cuda))]
        {
            let _ = start;
            unreachable!("no event exists without the shim")
        }
    }
}

#[cfg(cxxlm_cuda)]
impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: from the shim, freed once (the CUDA stream itself stays torch's).
        unsafe { ffi::cxxlm_stream_free(self.stream) }
    }
}

#[cfg(cxxlm_cuda)]
impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: from cxxlm_event_record, freed once; CUDA keeps it until it is reached.
        unsafe { ffi::cxxlm_event_free(self.event) }
    }
}

#[cfg(cxxlm_cuda)]
impl Drop for Entered {
    fn drop(&mut self) {
        // SAFETY: a live stream handle.
        unsafe { ffi::cxxlm_stream_make_current(self.previous.stream) }
    }
}
