//! A module's inference forward captured into a CUDA graph for one input shape, and replayed: one
//! launch for the whole network instead of one per kernel.
use super::ffi::Graph;
use crate::error::ScConvError;
use std::marker::PhantomData;
use tch::{Device, Tensor};

/// A captured forward pass (see [`CudaGraph::capture`]). It borrows the module: the graph reads the
/// module's weights where they were at capture, so they must outlive it and keep their storage.
pub struct CudaGraph<'m> {
    graph: Graph,
    input: Tensor,
    output: Tensor,
    _module: PhantomData<&'m ()>,
}

impl std::fmt::Debug for CudaGraph<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaGraph")
            .field("input", &self.input.size())
            .field("output", &self.output.size())
            .finish()
    }
}

fn graph_error(what: impl std::fmt::Display) -> ScConvError {
    ScConvError::Cuda(format!("graph: {what}"))
}

impl<'m> CudaGraph<'m> {
    /// Captures `forward` (a module's inference forward, under `no_grad`) on inputs shaped like
    /// `example` (a CUDA tensor): a few warm-up runs first (cuDNN picks its algorithms, memory is
    /// allocated), then one captured run. Weights are read as they are now: parameters changed in place
    /// later are seen by the replay, but constants a fast path derived from them are not (re-capture).
    pub fn capture<F>(
        _module: &'m impl ?Sized,
        example: &Tensor,
        forward: F,
    ) -> Result<CudaGraph<'m>, ScConvError>
    where
        F: Fn(&Tensor) -> Tensor,
    {
        let Device::Cuda(device) = example.device() else {
            return Err(graph_error(format!(
                "the example input is on {:?}; graphs are CUDA only",
                example.device()
            )));
        };
        let input = example.detach().copy();
        let mut output = None;
        let mut graph = Graph::new().map_err(graph_error)?;
        tch::no_grad(|| graph.capture(device, 3, || output = Some(forward(&input)))).map_err(graph_error)?;
        let output = output.ok_or_else(|| graph_error("the forward produced no output"))?;
        Ok(CudaGraph { graph, input, output, _module: PhantomData })
    }

    /// Copies `x` into the captured input and replays the graph. The result is the graph's own output
    /// tensor, overwritten by the next `run` (copy it to keep it). `x` must have the captured shape,
    /// dtype and device.
    pub fn run(&mut self, x: &Tensor) -> Result<&Tensor, ScConvError> {
        let (want, got) =
            ((self.input.size(), self.input.kind(), self.input.device()), (x.size(), x.kind(), x.device()));
        if want != got {
            return Err(ScConvError::InvalidInput(format!(
                "the graph was captured for {want:?} (shape, dtype, device), got {got:?}"
            )));
        }
        tch::no_grad(|| self.input.copy_(x));
        self.graph.replay().map_err(graph_error)?;
        Ok(&self.output)
    }

    /// Replays the graph on the input already in place (what `run` does after its copy).
    pub fn replay(&mut self) -> Result<&Tensor, ScConvError> {
        self.graph.replay().map_err(graph_error)?;
        Ok(&self.output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{scconv, ScConvConfig};
    use tch::{nn::VarStore, Kind};

    #[test]
    fn a_graph_of_a_cpu_forward_is_refused_saying_why() {
        let vs = VarStore::new(Device::Cpu);
        let block = scconv(vs.root(), &ScConvConfig::new(32)).unwrap();
        let x = Tensor::randn([1, 32, 8, 8], (Kind::Float, Device::Cpu));
        let err = block.cuda_graph(&x).unwrap_err().to_string();
        assert!(err.contains("on Cpu; graphs are CUDA only"), "{err}");
        let wrong = Tensor::randn([1, 16, 8, 8], (Kind::Float, Device::Cpu));
        let err = block.cuda_graph(&wrong).unwrap_err().to_string();
        assert!(err.starts_with("invalid input"), "the input is checked first: {err}");
    }
}
