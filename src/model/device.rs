//! Which device the model computes on: the user's choice (`auto`, `cpu`, `cuda[:N]`, `metal[:N]`,
//! `gpu`), resolved into a candle [`Device`].
//!
//! candle compiles its GPU backends only with its `cuda` and `metal` features, which vlmpipe
//! forwards (`cargo build --release --features cuda`). A default build is CPU-only; asking it for
//! a GPU fails with the command that builds one, rather than with candle's generic
//! "not compiled with cuda support".
//!
//! The device is a property of the machine, not of the pipeline: it is never part of a stage
//! fingerprint, so moving a pipeline between a laptop and a GPU box reuses its cache.

use std::fmt;
use std::str::FromStr;

use candle_core::{Device, DeviceLocation};

/// A GPU backend candle can be built with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GpuBackend {
    Cuda,
    Metal,
}

impl GpuBackend {
    /// The name used on the command line and as the cargo feature.
    pub(crate) fn name(self) -> &'static str {
        match self {
            GpuBackend::Cuda => "cuda",
            GpuBackend::Metal => "metal",
        }
    }

    /// The name in prose ("CUDA", "Metal").
    fn title(self) -> &'static str {
        match self {
            GpuBackend::Cuda => "CUDA",
            GpuBackend::Metal => "Metal",
        }
    }

    /// Whether this binary was compiled with the backend.
    pub(crate) fn compiled(self) -> bool {
        match self {
            GpuBackend::Cuda => cfg!(feature = "cuda"),
            GpuBackend::Metal => cfg!(feature = "metal"),
        }
    }
}

/// The device asked for, before it is opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The first CUDA GPU when built with `cuda` and one opens, else the first Metal GPU when
    /// built with `metal` and one opens, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// The first GPU of whichever backend this binary has (CUDA first); never the CPU.
    Gpu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
    /// A Metal GPU by ordinal.
    Metal(usize),
}

/// Why a device string could not be parsed or a device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device `{input}`; expected cpu, cuda[:N], metal[:N], gpu or auto")]
    Unknown { input: String },
    #[error(
        "invalid device ordinal `{ordinal}` in `{input}`; expected a number, e.g. `{backend}:0`"
    )]
    BadOrdinal {
        input: String,
        backend: &'static str,
        ordinal: String,
    },
    #[error(
        "device `{requested}` needs {title} support, but this vlmpipe was built without it; \
         rebuild with `cargo install --path . --features {feature}` \
         (or `cargo build --release --features {feature}`)"
    )]
    NotCompiled {
        requested: String,
        title: &'static str,
        feature: &'static str,
    },
    #[error(
        "device `gpu` needs a GPU backend, but this vlmpipe was built for the CPU only; rebuild \
         with `cargo install --path . --features cuda` (NVIDIA) or `--features metal` (Apple)"
    )]
    NoGpuBackend,
    #[error("cannot open device `{device}`")]
    Unavailable {
        device: String,
        #[source]
        source: candle_core::Error,
    },
}

/// A resolved device and, for `auto`, the GPUs it tried and passed over.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub device: Device,
    /// One line per compiled backend `auto` could not open (e.g. a CUDA build on a machine
    /// without a driver), so a silent fall back to the CPU can still be reported.
    pub fallbacks: Vec<String>,
}

impl DeviceChoice {
    /// Opens the device; see [`DeviceChoice::resolve_explained`] for what `auto` passed over.
    pub fn resolve(&self) -> Result<Device, DeviceError> {
        Ok(self.resolve_explained()?.device)
    }

    /// Opens the device, saying which GPUs `auto` tried and could not open.
    pub(crate) fn resolve_explained(&self) -> Result<Resolved, DeviceError> {
        let exact = |device| {
            Ok(Resolved {
                device,
                fallbacks: Vec::new(),
            })
        };
        match *self {
            DeviceChoice::Cpu => exact(Device::Cpu),
            DeviceChoice::Cuda(n) => exact(open(GpuBackend::Cuda, n, self)?),
            DeviceChoice::Metal(n) => exact(open(GpuBackend::Metal, n, self)?),
            DeviceChoice::Gpu => {
                let backend = [GpuBackend::Cuda, GpuBackend::Metal]
                    .into_iter()
                    .find(|b| b.compiled())
                    .ok_or(DeviceError::NoGpuBackend)?;
                exact(open(backend, 0, self)?)
            }
            DeviceChoice::Auto => {
                let mut fallbacks = Vec::new();
                for backend in [GpuBackend::Cuda, GpuBackend::Metal] {
                    if !backend.compiled() {
                        continue;
                    }
                    match open(backend, 0, self) {
                        Ok(device) => return Ok(Resolved { device, fallbacks }),
                        Err(e) => fallbacks.push(format!(
                            "{} 0 did not open ({}); trying the next device",
                            backend.title(),
                            error_chain(&e)
                        )),
                    }
                }
                Ok(Resolved {
                    device: Device::Cpu,
                    fallbacks,
                })
            }
        }
    }
}

/// Opens GPU `ordinal` of `backend`, or says how to build a binary that can.
fn open(
    backend: GpuBackend,
    ordinal: usize,
    requested: &DeviceChoice,
) -> Result<Device, DeviceError> {
    if !backend.compiled() {
        // candle's stubs would fail too, but without saying how to get a build that works.
        return Err(DeviceError::NotCompiled {
            requested: requested.to_string(),
            title: backend.title(),
            feature: backend.name(),
        });
    }
    let opened = match backend {
        GpuBackend::Cuda => Device::new_cuda(ordinal),
        GpuBackend::Metal => Device::new_metal(ordinal),
    };
    opened.map_err(|source| DeviceError::Unavailable {
        device: format!("{}:{ordinal}", backend.name()),
        source,
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let text = input.trim().to_ascii_lowercase();
        let (name, ordinal) = match text.split_once(':') {
            Some((name, ordinal)) => (name, Some(ordinal)),
            None => (text.as_str(), None),
        };
        let parse_ordinal = |backend: &'static str| -> Result<usize, DeviceError> {
            match ordinal {
                None => Ok(0),
                Some(n) => n.trim().parse().map_err(|_| DeviceError::BadOrdinal {
                    input: input.to_owned(),
                    backend,
                    ordinal: n.to_owned(),
                }),
            }
        };
        match name {
            "cuda" => Ok(DeviceChoice::Cuda(parse_ordinal("cuda")?)),
            "metal" => Ok(DeviceChoice::Metal(parse_ordinal("metal")?)),
            "cpu" | "auto" | "gpu" if ordinal.is_some() => Err(DeviceError::Unknown {
                input: input.to_owned(),
            }),
            "cpu" => Ok(DeviceChoice::Cpu),
            "auto" => Ok(DeviceChoice::Auto),
            "gpu" => Ok(DeviceChoice::Gpu),
            _ => Err(DeviceError::Unknown {
                input: input.to_owned(),
            }),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Gpu => f.write_str("gpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceChoice::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

/// How a device is named in records and reports: `cpu`, `cuda:0`, `metal:0`.
pub(crate) fn device_label(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".to_owned(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The backends this binary was compiled with, CPU first (`["cpu", "cuda"]`).
pub(crate) fn compiled_backends() -> Vec<&'static str> {
    let mut backends = vec!["cpu"];
    backends.extend(
        [GpuBackend::Cuda, GpuBackend::Metal]
            .into_iter()
            .filter(|b| b.compiled())
            .map(GpuBackend::name),
    );
    backends
}

/// `vlmpipe --version`: the version and the compiled backends.
pub(crate) const LONG_VERSION: &str = match (cfg!(feature = "cuda"), cfg!(feature = "metal")) {
    (true, true) => concat!(env!("CARGO_PKG_VERSION"), " (backends: cpu, cuda, metal)"),
    (true, false) => concat!(env!("CARGO_PKG_VERSION"), " (backends: cpu, cuda)"),
    (false, true) => concat!(env!("CARGO_PKG_VERSION"), " (backends: cpu, metal)"),
    (false, false) => concat!(env!("CARGO_PKG_VERSION"), " (backends: cpu)"),
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_parses_and_displays_canonically() -> Result<(), DeviceError> {
        let cases = [
            ("auto", DeviceChoice::Auto, "auto"),
            ("cpu", DeviceChoice::Cpu, "cpu"),
            ("CPU", DeviceChoice::Cpu, "cpu"),
            ("gpu", DeviceChoice::Gpu, "gpu"),
            ("cuda", DeviceChoice::Cuda(0), "cuda:0"),
            ("cuda:1", DeviceChoice::Cuda(1), "cuda:1"),
            (" cuda:3 ", DeviceChoice::Cuda(3), "cuda:3"),
            ("metal", DeviceChoice::Metal(0), "metal:0"),
            ("metal:2", DeviceChoice::Metal(2), "metal:2"),
        ];
        for (input, choice, display) in cases {
            let parsed: DeviceChoice = input.parse()?;
            assert_eq!(parsed, choice, "{input}");
            assert_eq!(parsed.to_string(), display, "{input}");
            // Display round-trips through FromStr.
            assert_eq!(display.parse::<DeviceChoice>()?, choice);
        }
        Ok(())
    }

    #[test]
    fn bad_strings_say_what_was_expected() {
        let message = |input: &str| match input.parse::<DeviceChoice>() {
            Ok(choice) => format!("parsed as {choice}"),
            Err(e) => e.to_string(),
        };
        assert_eq!(
            message("cdua"),
            "unknown device `cdua`; expected cpu, cuda[:N], metal[:N], gpu or auto"
        );
        assert_eq!(
            message("cpu:0"),
            "unknown device `cpu:0`; expected cpu, cuda[:N], metal[:N], gpu or auto"
        );
        assert_eq!(
            message("cuda:x"),
            "invalid device ordinal `x` in `cuda:x`; expected a number, e.g. `cuda:0`"
        );
        assert_eq!(
            message("metal:-1"),
            "invalid device ordinal `-1` in `metal:-1`; expected a number, e.g. `metal:0`"
        );
        assert!(message("").starts_with("unknown device ``"));
    }

    #[test]
    fn cpu_resolves_to_the_cpu() -> Result<(), DeviceError> {
        let resolved = DeviceChoice::Cpu.resolve_explained()?;
        assert!(resolved.device.is_cpu());
        assert!(resolved.fallbacks.is_empty());
        assert_eq!(device_label(&resolved.device), "cpu");
        Ok(())
    }

    #[test]
    #[cfg(not(any(feature = "cuda", feature = "metal")))]
    fn auto_is_the_cpu_in_a_cpu_build() -> Result<(), DeviceError> {
        let resolved = DeviceChoice::Auto.resolve_explained()?;
        assert!(resolved.device.is_cpu());
        // Nothing was tried, so nothing is reported.
        assert!(resolved.fallbacks.is_empty());
        assert_eq!(compiled_backends(), ["cpu"]);
        assert!(LONG_VERSION.ends_with("(backends: cpu)"));
        Ok(())
    }

    #[test]
    #[cfg(not(feature = "cuda"))]
    fn cuda_without_the_feature_says_how_to_rebuild() {
        match DeviceChoice::Cuda(1).resolve() {
            Ok(device) => panic!("opened {device:?} in a build without CUDA"),
            Err(e) => assert_eq!(
                e.to_string(),
                "device `cuda:1` needs CUDA support, but this vlmpipe was built without it; \
                 rebuild with `cargo install --path . --features cuda` \
                 (or `cargo build --release --features cuda`)"
            ),
        }
    }

    #[test]
    #[cfg(not(feature = "metal"))]
    fn metal_without_the_feature_says_how_to_rebuild() {
        match DeviceChoice::Metal(0).resolve() {
            Ok(device) => panic!("opened {device:?} in a build without Metal"),
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains("needs Metal support"), "{text}");
                assert!(text.contains("--features metal"), "{text}");
            }
        }
    }

    #[test]
    #[cfg(not(any(feature = "cuda", feature = "metal")))]
    fn gpu_without_any_backend_names_both_features() {
        match DeviceChoice::Gpu.resolve() {
            Ok(device) => panic!("opened {device:?} in a CPU-only build"),
            Err(e) => {
                let text = e.to_string();
                assert!(matches!(e, DeviceError::NoGpuBackend), "{text}");
                assert!(
                    text.contains("--features cuda") && text.contains("--features metal"),
                    "{text}"
                );
            }
        }
    }
}
