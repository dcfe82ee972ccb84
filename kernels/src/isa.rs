//! Which instruction set a kernel runs with, detected once per process.
//!
//! Every kernel has one body, written as plain loops over blocks that the
//! compiler vectorises. [`dispatch!`] instantiates that body three times on
//! x86-64 (inside `#[target_feature(enable = "avx512f,...")]`, `"avx2,fma"`
//! and plain) and calls the best one this CPU supports. Other architectures
//! get the scalar-feature build (NEON is baseline on aarch64, so it is used
//! there without detection). Tests call every instantiation the CPU can run
//! through the `*_with(isa, ...)` entry points and report the ones it cannot.

use std::sync::OnceLock;

/// An instruction-set level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// No extension beyond the target's baseline.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 (F, BW, VL) + the AVX2 set.
    Avx512,
}

impl Isa {
    /// Every level, best first.
    pub const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Scalar];

    /// Can this CPU run it?
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.supported()
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The best level this CPU supports (detected once).
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| Isa::ALL.into_iter().find(|i| i.supported()).unwrap_or(Isa::Scalar))
    }
}

/// Defines `$name(isa, args...)`, which runs the `#[inline(always)]` fn
/// `$body(args...)` compiled for `isa`: the body is inlined into one
/// `#[target_feature]` function per level, so each copy is vectorised for
/// its instruction set.
///
/// The generated function panics if `isa` is not supported by this CPU;
/// the public entry points check [`Isa::supported`] first.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:path) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(isa: $crate::isa::Isa, $($arg: $ty),*) $(-> $ret)? {
            assert!(isa.supported(), "{isa:?} is not supported by this CPU");
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
                #[allow(clippy::too_many_arguments)]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma,f16c")]
                #[allow(clippy::too_many_arguments)]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                match isa {
                    // SAFETY: `isa.supported()` was asserted above, so the CPU
                    // has every feature that avx512 is compiled with.
                    $crate::isa::Isa::Avx512 => unsafe { avx512($($arg),*) },
                    // SAFETY: as above, for avx2.
                    $crate::isa::Isa::Avx2 => unsafe { avx2($($arg),*) },
                    $crate::isa::Isa::Scalar => $body($($arg),*),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                $body($($arg),*)
            }
        }
    };
}
pub(crate) use multiversion;
