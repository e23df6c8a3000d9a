//! TorchScript export by tracing (`CModule::create_by_tracing`), for any libtorch runtime (Python's
//! `torch.jit.load`, C++, TorchServe). The modules are written so that tracing bakes in no batch or
//! spatial size (GroupBatchnorm2d reshapes through its group dimension): the exported file accepts any
//! size the module accepts, not only the traced one.
use crate::error::ScConvError;
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

/// Writes `module` to `path`; an existing file is kept unless `overwrite`.
pub fn save(module: &CModule, path: &Path, overwrite: bool) -> Result<(), ScConvError> {
    let error = |reason: String| ScConvError::Write { path: path.display().to_string(), reason };
    if path.exists() && !overwrite {
        return Err(error("the file exists; pass --force (overwrite = true) to replace it".into()));
    }
    module.save(path).map_err(|e| error(e.to_string()))
}
