//! The protobuf codec of every generated gRPC client and server: prost, with
//! small initial buffers.
//!
//! tonic's default codec starts each encode and decode buffer at 8 KiB.
//! ExProto messages are mostly tens of bytes, and in streaming mode every
//! EMQX connection holds two to five open streams, each with its own decode
//! buffer for its whole life: 8 KiB each made an idle streaming connection
//! cost ~35 KB of adapter memory. Buffers still grow for large messages.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial bytes of each encode or decode buffer.
const BUFFER: usize = 512;
/// tonic's default: encoded bytes gathered before a stream yields them.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with [`BUFFER`]-byte initial buffers.
#[derive(Debug, Clone, Copy)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER, YIELD_THRESHOLD))
    }
}
