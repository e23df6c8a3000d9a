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

/// Writes `module` to `path`; an existing file is kept unless `overwrite`. The module goes to a
/// temporary file beside `path` first and is renamed into place, so a failed write leaves nothing behind.
pub fn save(module: &CModule, path: &Path, overwrite: bool) -> Result<(), ScConvError> {
    let error = |reason: String| ScConvError::Write { path: path.display().to_string(), reason };
    if path.is_dir() {
        return Err(error("is a folder; give a file path such as model.pt".into()));
    }
    if path.exists() && !overwrite {
        return Err(error("the file exists; pass --force (overwrite = true) to replace it".into()));
    }
    let name = path.file_name().ok_or_else(|| error("not a file path".into()))?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty() && !p.is_dir()) {
        return Err(error(format!("the folder {} does not exist", parent.display())));
    }
    let partial = path.with_file_name(format!(".{}.partial", name.to_string_lossy()));
    let written = module.save(&partial).map_err(|e| error(e.to_string()));
    let renamed = written.and_then(|()| std::fs::rename(&partial, path).map_err(|e| error(e.to_string())));
    if renamed.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    renamed
}
