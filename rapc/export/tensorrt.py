"""TensorRT engines from the exported ONNX files, and a runner for them.

One builder drives either module with the same API: ``tensorrt`` (10.x or 11.x, for
datacenter GPUs, Hopper included) or ``tensorrt_rtx`` (TensorRT for RTX, which builds
engines without a GPU for chosen RTX-class compute capabilities, CI's real build
check). Networks are strongly typed: precision comes from the ONNX file (fp16 graph,
int8 Q/DQ), which TensorRT 11 requires and 10 accepts. Only this module and the bench
runner that reuses it import TensorRT, and only inside functions.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from rapc.errors import RapcError
from rapc.export.onnx import INPUT
from rapc.export.runners import Runner
from rapc.rundir import atomic_write

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
INSTALL = {"tensorrt": "pip install 'rapc[gpu]'", "tensorrt-rtx": "pip install tensorrt-rtx"}
NOT_INSTALLED = f"TensorRT is not installed ({INSTALL['tensorrt']})"
RTX_TARGETS = ("SM75", "SM80", "SM86", "SM89", "SM120")  # compute capabilities TensorRT-RTX builds for (no Hopper)
DEFAULT_RTX_TARGET = "SM86"
WORKSPACE_BYTES = 1 << 30


@dataclass(frozen=True)
class EngineSpec:
    """What to build; everything here is plain data, checked without TensorRT."""

    onnx: Path
    input_shape: tuple[int, ...]  # one image: (channels, height, width)
    max_batch: int = 256
    backend: str = "tensorrt"
    target: str | None = None  # tensorrt-rtx compute capability, e.g. "SM86"
    sparse: bool = False  # allow 2:4 sparse tactics (SPARSE_WEIGHTS)

    def profile(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) input shapes: batch 1..max_batch, tuned for the largest power of two <= min(64, max)."""
        if self.max_batch < 1:
            raise RapcError(f"max batch must be at least 1, got {self.max_batch}")
        opt = 1 << (min(64, self.max_batch).bit_length() - 1)
        return tuple((b, *self.input_shape) for b in (1, opt, self.max_batch))  # type: ignore[return-value]

    @property
    def engine(self) -> Path:
        """model.fp16.onnx -> model.fp16.trt.engine, or model.fp16.rtx-sm86.engine."""
        tag = "trt" if self.backend == "tensorrt" else f"rtx-{(self.target or DEFAULT_RTX_TARGET).lower()}"
        return self.onnx.with_suffix(f".{tag}.engine")

    @property
    def timing_cache(self) -> Path:
        return self.engine.with_suffix(".timing.cache")


def load_backend(backend: str) -> ModuleType:
    if backend not in MODULES:
        raise RapcError(f"unknown TensorRT backend {backend!r}; known: {', '.join(MODULES)}")
    try:
        return importlib.import_module(MODULES[backend])
    except ImportError:
        raise RapcError(f"{MODULES[backend]} is not installed; install it with `{INSTALL[backend]}`") from None


def gpu_present() -> bool:
    import torch

    return torch.cuda.is_available()


def cannot_run_engines() -> str | None:
    """Why a TensorRT engine cannot run on this machine, or None."""
    if not gpu_present():
        return "no CUDA GPU"
    try:
        load_backend("tensorrt")
    except RapcError:
        return NOT_INSTALLED
    return None


def check_can_build(backend: str) -> None:
    """A RapcError, before any engine is built, when ``backend`` cannot build engines here.

    TensorRT (``--trt``) needs its package and a CUDA GPU; TensorRT-RTX (``--trt-rtx``) only its
    package. Asking for TensorRT never gets TensorRT-RTX engines instead: those run on RTX-class
    GPUs, not on the datacenter GPU the user asked for, so the error names the other flag and
    leaves the choice to the user.
    """
    if backend != "tensorrt":
        load_backend(backend)
        return
    missing = []
    try:
        load_backend("tensorrt")
    except RapcError:
        missing.append(NOT_INSTALLED)
    if not gpu_present():
        missing.append("no CUDA GPU is present")
    if missing:
        try:
            load_backend("tensorrt-rtx")
            rtx = ""
        except RapcError:
            rtx = f" once installed ({INSTALL['tensorrt-rtx']})"
        raise RapcError(f"cannot build a TensorRT engine: {' and '.join(missing)}; the ONNX files are written. "
                        f"--trt-rtx builds TensorRT-RTX engines (for RTX GPUs) without a GPU{rtx}")


def _collecting_logger(trt: ModuleType):
    """A TensorRT logger that keeps warnings and errors for the error message instead of printing them:
    TensorRT-RTX logs CUDA errors on a machine without a GPU even when the build succeeds."""

    class Collector(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity, msg: str) -> None:
            if severity <= trt.ILogger.Severity.WARNING:
                self.messages.append(msg)

    return Collector()


def _parse(trt: ModuleType, network, logger, onnx: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RapcError(f"TensorRT cannot parse {onnx.name}: {errors}")


@dataclass(frozen=True)
class BuiltEngine:
    path: Path
    backend: str
    version: str
    seconds: float
    bytes: int


def build_engine(spec: EngineSpec) -> BuiltEngine:
    """Parse the ONNX file into a strongly typed network and serialize an engine beside it."""
    trt = load_backend(spec.backend)
    logger = _collecting_logger(trt)
    builder = trt.Builder(logger)
    creation = trt.NetworkDefinitionCreationFlag
    # TensorRT 10 needs the flag; in 11 strong typing is the only mode.
    flags = 1 << int(creation.STRONGLY_TYPED) if hasattr(creation, "STRONGLY_TYPED") else 0
    network = builder.create_network(flags)
    _parse(trt, network, logger, spec.onnx)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT, *spec.profile())
    config.add_optimization_profile(profile)
    # A timing cache beside the engine makes rebuilds fast; TensorRT-RTX times nothing at build time.
    cache = None
    if spec.backend == "tensorrt":
        cache = config.create_timing_cache(spec.timing_cache.read_bytes() if spec.timing_cache.is_file() else b"")
        config.set_timing_cache(cache, False)
    if spec.sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if spec.backend == "tensorrt-rtx":
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, spec.target or DEFAULT_RTX_TARGET), 0)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        last = logger.messages[-1] if logger.messages else "no message"
        raise RapcError(f"TensorRT could not build an engine from {spec.onnx.name} ({last})")
    seconds = time.perf_counter() - start
    atomic_write(spec.engine, lambda tmp: tmp.write_bytes(memoryview(serialized)))
    if cache is not None:
        atomic_write(spec.timing_cache, lambda tmp: tmp.write_bytes(memoryview(cache.serialize())))
    return BuiltEngine(spec.engine, spec.backend, trt.__version__, seconds, serialized.nbytes)


class TensorRTRunner(Runner):
    """Runs a serialized engine on the current CUDA device (torch tensors for the buffers)."""

    device = "cuda"

    def __init__(self, engine: Path, backend: str = "tensorrt") -> None:
        import torch

        if not torch.cuda.is_available():
            raise RapcError("running a TensorRT engine needs a CUDA GPU; none is present")
        self.torch = torch
        self.trt = load_backend(backend)
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.engine = self.trt.Runtime(self.logger).deserialize_cuda_engine(engine.read_bytes())
        if self.engine is None:
            raise RapcError(f"{engine}: TensorRT cannot deserialize it (built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == self.trt.TensorIOMode.OUTPUT)
        self.stream = torch.cuda.Stream()
        self.name = f"tensorrt:{engine.name}"
        self.runtime = "TensorRT-RTX" if backend == "tensorrt-rtx" else "TensorRT"

    def infer_torch(self, images):
        """Device-to-device inference on a float32 CUDA tensor [batch, C, H, W]; returns logits on the GPU."""
        images = images.contiguous()
        self.context.set_input_shape(INPUT, tuple(images.shape))
        out = self.torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=self.torch.float32, device=images.device)
        self.context.set_tensor_address(INPUT, images.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        self.stream.wait_stream(self.torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RapcError(f"{self.name}: execution failed")
        self.stream.synchronize()
        return out

    def infer(self, images: np.ndarray) -> np.ndarray:
        return self.infer_torch(self.torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).cuda()).cpu().numpy()

    def prepare(self, images: np.ndarray) -> None:
        self.host = self.torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).pin_memory()
        self.staged = self.host.cuda()

    def run(self) -> None:
        self.infer_torch(self.staged)

    def transfer(self) -> None:
        self.staged.copy_(self.host, non_blocking=True)
        self.torch.cuda.synchronize()
