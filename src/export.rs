//! TorchScript export by tracing (`CModule::create_by_tracing`), for any libtorch runtime (Python's
//! `torch.jit.load`, C++, TorchServe). The modules are written so that tracing bakes in no batch or
//! spatial size (GroupBatchnorm2d reshapes through its group dimension): the exported file accepts any
//! size the module accepts, not only the traced one.
use crate::error::ScConvError;
use crate::output;
use std::path::Path;
use tch::{nn::VarStore, CModule, Tensor};

/// Traces `forward` on `example`. The store is frozen and stays so: the module holds its weights as
/// constants by reference, and a constant that requires grad can be saved but not loaded back.
pub fn trace(
    vs: &mut VarStore,
    example: &Tensor,
    forward: impl Fn(&Tensor) -> Tensor,
) -> Result<CModule, ScConvError> {
    vs.freeze();
    let mut closure = |inputs: &[Tensor]| vec![forward(&inputs[0])];
    let module = tch::no_grad(|| {
        CModule::create_by_tracing("ScConvTch", "forward", &[example.shallow_clone()], &mut closure)
    });
    Ok(module?)
}

/// Writes `module` to `path` through `output::write_file` (temporary file, sync, rename; an existing
/// file kept unless `overwrite`). libtorch's own writer aborts the process when a write fails (a full
/// disk), so the module is first saved to the system's temporary folder and copied from there: a
/// failure on the target's disk is then an error like any other.
pub fn save(module: &CModule, path: &Path, overwrite: bool) -> Result<(), ScConvError> {
    output::write_file(path, overwrite, |file| {
        let staged = tempfile::Builder::new().prefix(".scconv-export-").suffix(".pt").tempfile()?;
        let _registered = output::Registered::new(staged.path());
        module.save(staged.path()).map_err(|e| std::io::Error::other(e.to_string()))?;
        std::io::copy(&mut std::fs::File::open(staged.path())?, file).map(drop)
    })
}
