//! The elements the form's own kernels read and write: fp32, or bf16 as libtorch stores it (a `u16`
//! holding an fp32's top half), read exactly and rounded as libtorch's `to(bf16)` rounds.
use tch::{Kind, Tensor};

/// A stored element: fp32, or bf16's bits.
pub(crate) trait Value: Copy + Sync {
    /// Zero.
    const ZERO: Self;
    /// The element as an fp32 value (exact).
    fn value(self) -> f32;
}

impl Value for f32 {
    const ZERO: f32 = 0.0;
    #[inline(always)]
    fn value(self) -> f32 {
        self
    }
}

/// A bf16 element's bits, as libtorch stores them.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub(crate) struct Bf16(pub(crate) u16);

impl Value for Bf16 {
    const ZERO: Bf16 = Bf16(0);
    #[inline(always)]
    fn value(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }
}

/// `v` rounded to the nearest bf16 (ties to even) as libtorch's `to(bf16)` rounds it; a NaN becomes
/// a quiet NaN (libtorch's NaN bits differ between its scalar and vector code: only NaN-ness is kept).
#[inline(always)]
pub(crate) fn bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    // Integer compares only (a float compare beside them keeps LLVM from vectorising the loops).
    let nan = (bits & 0x7fff_ffff) > 0x7f80_0000;
    (if nan { 0x7fc0 } else { rounded }) as u16
}

/// How a result is stored: fp32; bf16 values in fp32 (the emulated bf16 form); bf16's bits.
pub(crate) trait Store {
    /// The element written.
    type Elem;
    /// `v` as stored.
    fn put(v: f32) -> Self::Elem;
    /// Elements written as plain fp32 values (fp32 stores only; `None` for the others).
    fn as_fp32(_: &mut [Self::Elem]) -> Option<&mut [f32]> {
        None
    }
}

impl Store for f32 {
    type Elem = f32;
    #[inline(always)]
    fn put(v: f32) -> f32 {
        v
    }
    fn as_fp32(elements: &mut [f32]) -> Option<&mut [f32]> {
        Some(elements)
    }
}

/// bf16 values in fp32 elements (the emulated bf16 form).
pub(crate) struct Bf16Values;

impl Store for Bf16Values {
    type Elem = f32;
    #[inline(always)]
    fn put(v: f32) -> f32 {
        Bf16(bf16_bits(v)).value()
    }
}

/// bf16 elements (the native bf16 form).
pub(crate) struct Bf16Bits;

impl Store for Bf16Bits {
    type Elem = u16;
    #[inline(always)]
    fn put(v: f32) -> u16 {
        bf16_bits(v)
    }
}

/// A contiguous CPU tensor's elements as stored, fp32 or bf16; `None` for other kinds. SAFETY: the
/// caller keeps `t` alive and unwritten while the slice is used.
pub(crate) unsafe fn stored(t: &Tensor) -> Option<Stored<'_>> {
    match t.kind() {
        Kind::Float => Some(Stored::F32(crate::fast::sru_kernel::elements(t))),
        Kind::BFloat16 => Some(Stored::Bf16(crate::fast::sru_kernel::elements(t))),
        _ => None,
    }
}

/// A tensor's elements, by kind.
#[derive(Clone, Copy)]
pub(crate) enum Stored<'a> {
    F32(&'a [f32]),
    Bf16(&'a [Bf16]),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rounding to bf16 is libtorch's on the values where rounding is delicate: ties (to even),
    /// just past them, the largest finite values (to infinity), infinities, subnormals, NaN.
    #[test]
    fn bf16_rounding_is_libtorchs() {
        let bits: [u32; 14] = [
            0x3f80_8000,
            0x3f81_8000,
            0x3f80_8001,
            0x3f80_7fff,
            0x7f7f_ffff,
            0xff7f_ffff,
            0x7f80_0000,
            0xff80_0000,
            0x0000_8000,
            0x0001_8000,
            0x8000_0001,
            0x0000_0000,
            0x8000_0000,
            0x4049_0fdb,
        ];
        let values: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let libtorch = Tensor::from_slice(&values).to_kind(Kind::BFloat16);
        let read = Vec::<f32>::try_from(&libtorch.to_kind(Kind::Float)).unwrap();
        for (v, &expected) in values.iter().zip(&read) {
            let ours = Bf16(bf16_bits(*v)).value();
            assert_eq!(ours.to_bits(), expected.to_bits(), "{v:e} ({:#010x})", v.to_bits());
        }
        assert!(Bf16(bf16_bits(f32::NAN)).value().is_nan());
        // Read back as libtorch stores them.
        // SAFETY: `libtorch` is a contiguous bf16 CPU tensor alive meanwhile.
        let Some(Stored::Bf16(elements)) = (unsafe { stored(&libtorch) }) else { panic!("bf16") };
        let again: Vec<u32> = elements.iter().map(|e| e.value().to_bits()).collect();
        assert_eq!(again, read.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    }
}
