"""Facts about where we run. Pure queries: nothing here initializes CUDA.

GPUs are listed through NVML (the driver's management library, loaded with ctypes) or
``nvidia-smi``, never through the CUDA runtime: creating a CUDA context here would make
every later fork unusable for GPU work. This module is the one source of GPU facts:
one reader of ``CUDA_VISIBLE_DEVICES`` (`parse_visible_devices`, `visible_indices`), one
inventory (`gpu_inventory`), one peer-to-peer answer (`p2p_supported`). The launch
(`config`) and ``python -m notebook_launcher env`` (`diagnostics`) both read them, so the
report cannot say "all pairs" while the launch disables NCCL's peer-to-peer.

It also remembers where this process first initialized CUDA (`cuda_init_origin`): a
call that torch runs inside its lazy CUDA initialization keeps the stack, so a launch
that must fall back to spawn can name the notebook line that forced it. A library other
than torch (cupy, numba, JAX, Triton's backend probe) can initialize the CUDA *driver*
without torch knowing: `cuda_driver_initialized` asks the driver itself (a fork after
that crashes or hangs the ranks' first CUDA call).

The front end that shows this kernel's output (`frontend`: Colab, Kaggle, VS Code, a
Jupyter server's JupyterLab or Notebook 7) is read from each one's own markers, for the
dashboard's ``display="auto"``.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import traceback
import types
from dataclasses import dataclass, field, replace
from typing import Optional, Union

import torch

# Libraries that create a CUDA context as a side effect of being imported.
CUDA_ON_IMPORT_LIBRARIES = ("bitsandbytes", "cupy", "jax", "tensorflow", "numba.cuda", "pycuda.autoinit")
# Libraries that may initialize the CUDA driver (cuInit) when imported or first used, without
# torch knowing: named when the driver probe finds it initialized.
CUDA_DRIVER_LIBRARIES = ("cupy", "numba.cuda", "jax", "jaxlib", "tensorflow", "triton", "pycuda",
                         "cuda", "bitsandbytes", "vllm", "xformers", "onnxruntime", "tensorrt")
CUDA_DRIVER_LIBRARY = "libcuda.so"   # the driver's library (libcuda.so.1), not the runtime's (libcudart)
CUDA_SUCCESS = 0
SHM_PATH = "/dev/shm"

NVML_LIBRARY = "libnvidia-ml.so.1"
NVML_P2P_CAPS_INDEX_READ = 0      # nvmlGpuP2PCapsIndex_t: can one GPU read the other's memory
NVML_P2P_STATUS_OK = 0
NVIDIA_SMI_TIMEOUT = 15.0         # seconds; a wedged driver must not hang a launch or `env`
P2P_VERDICTS = {"OK": True, "NS": False, "CNS": False, "TNS": False, "NA": False}  # nvidia-smi topo -p2p


# ----------------------------------------------------------------- plain data
@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: Optional[float]  # e.g. 7.5 for a T4, 9.0 for an H100; None when unknown
    index: int = 0                        # as NVML counts: every GPU of the machine
    uuid: str = ""                        # "GPU-1a2b..."
    memory_mib: Optional[int] = None
    mig_uuids: tuple = ()                 # "MIG-..." of its MIG instances, when MIG is on

    @property
    def has_bf16(self) -> bool:
        """bf16 autocast is fast here (Ampere or newer); an unknown capability is not held against it."""
        return self.compute_capability is None or self.compute_capability >= 8.0


@dataclass(frozen=True)
class GpuInventory:
    source: str = "none"           # "nvml" | "nvidia-smi" | "none"
    driver: str = ""
    gpus: tuple = ()               # every GPU of the machine, GpuInfo
    visible: tuple = ()            # indices this process may use, in CUDA's order (CUDA_VISIBLE_DEVICES)
    p2p: dict = field(default_factory=dict)  # "i-j" (i < j) -> can read each other's memory; visible pairs
    error: str = ""

    @property
    def visible_gpus(self) -> tuple:
        by_index = {gpu.index: gpu for gpu in self.gpus}
        return tuple(by_index[i] for i in self.visible)


@dataclass(frozen=True)
class Environment:
    gpu_count: int             # visible CUDA devices (honours CUDA_VISIBLE_DEVICES)
    cuda_initialized: bool     # this process already holds a CUDA context
    platform: str              # "colab" | "kaggle" | "jupyter" | "ipython" | "python"
    cpu_count: int             # CPUs this process may run on
    gpus: tuple = field(default=())  # GpuInfo per visible GPU
    cuda_init_origin: str = ""       # what initialized CUDA here (see `cuda_init_origin`), if it is
    driver_initialized: bool = False  # the CUDA driver is initialized here (by torch or any other library)
    driver_init_origin: str = ""     # what did, when torch did not (see `driver_init_origin`)
    frontend: str = "script"         # see `frontend`

    @property
    def has_gpus(self) -> bool:
        return self.gpu_count > 0

    @property
    def in_notebook(self) -> bool:
        return self.platform in ("colab", "kaggle", "jupyter")


def detect() -> Environment:
    inventory = gpu_inventory() if torch.backends.cuda.is_built() else GpuInventory()
    initialized = cuda_initialized()
    driver = initialized or cuda_driver_initialized()
    return Environment(
        gpu_count=cuda_device_count(inventory),
        cuda_initialized=initialized,
        platform=platform(),
        cpu_count=usable_cpu_count(),
        gpus=inventory.visible_gpus,
        cuda_init_origin=cuda_init_origin() if initialized else "",
        driver_initialized=driver,
        driver_init_origin=driver_init_origin() if driver and not initialized else "",
        frontend=frontend(),
    )


# ----------------------------------------------------------------- CUDA_VISIBLE_DEVICES
def parse_visible_devices(value: Optional[str]) -> Optional[tuple]:
    """``CUDA_VISIBLE_DEVICES`` as CUDA reads it: None when unset (every GPU), else the
    entries that count, in order: ordinals (int) or UUIDs and their prefixes (str,
    ``GPU-...`` or ``MIG-...``).

    Commas separate entries and spaces around them are ignored. The first entry sets the
    kind (ordinals, ``GPU-`` or ``MIG-``); the list ends at the first entry that is not of
    that kind, so ``""``, ``"-1"`` and ``"none"`` hide every GPU. An ordinal is read as C's
    strtoul does (``"1abc"`` is 1). A repeated entry hides every GPU, as in CUDA.

    Example::

        parse_visible_devices("2, 0")          # (2, 0)
        parse_visible_devices("GPU-8f3a,1")   # ("GPU-8f3a",)
        parse_visible_devices("-1")            # ()
        parse_visible_devices(None)            # None: every GPU
    """
    if value is None:
        return None
    entries = [entry.strip() for entry in value.split(",")]
    prefix = next((p for p in ("GPU-", "MIG-") if entries[0].startswith(p)), None)
    chosen: list = []
    for entry in entries:
        item: Union[int, str, None] = entry if prefix and entry.startswith(prefix) and len(entry) > len(prefix) \
            else _ordinal(entry) if prefix is None else None
        if item is None:
            break
        if item in chosen:
            return ()
        chosen.append(item)
    return tuple(chosen)


def _ordinal(entry: str) -> Optional[int]:
    digits = len(entry) - len(entry.lstrip("0123456789"))
    return int(entry[:digits]) if digits else None


def visible_indices(gpus, cuda_visible_devices: Optional[str]) -> list:
    """Indices of ``gpus`` (GpuInfo) that a process with this ``CUDA_VISIBLE_DEVICES`` may
    use, in CUDA's order. An ordinal past the last GPU, or a UUID prefix that names no GPU
    or more than one, ends the list; a MIG instance is one device (CUDA shows a process
    a single MIG instance) on the GPU that holds it.

    Example::

        visible_indices(gpus_of_an_8_gpu_box, "3,1")   # [3, 1]
    """
    entries = parse_visible_devices(cuda_visible_devices)
    if entries is None:
        return [gpu.index for gpu in gpus]
    chosen: list = []
    for entry in entries:
        match = _gpu_for(gpus, entry)
        if match is None:
            break
        if match in chosen:
            return []
        chosen.append(match)
        if isinstance(entry, str) and entry.startswith("MIG-"):
            break
    return chosen


def _gpu_for(gpus, entry) -> Optional[int]:
    if isinstance(entry, int):
        return next((g.index for g in gpus if g.index == entry), None)
    if entry.startswith("MIG-"):
        found = [g.index for g in gpus if any(uuid.startswith(entry) for uuid in g.mig_uuids)]
        if not found and len(gpus) == 1:
            found = [gpus[0].index]  # MIG instances not listed (no NVML): a machine's only GPU holds it
    else:
        found = [g.index for g in gpus if g.uuid.startswith(entry)]
    return found[0] if len(found) == 1 else None


# ----------------------------------------------------------------- the inventory
def gpu_inventory() -> GpuInventory:
    """Every GPU of the machine, those this process may use, and peer-to-peer between
    those: through NVML, else ``nvidia-smi``; empty where neither is installed.

    Example::

        inventory = gpu_inventory()
        inventory.visible_gpus, p2p_supported(inventory)
    """
    machine = _query_machine()
    visible = visible_indices(machine.gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    pairs = {_pair(a, b) for a in visible for b in visible if a < b}
    return replace(machine, visible=tuple(visible),
                   p2p={key: ok for key, ok in machine.p2p.items() if key in pairs})


def _pair(a: int, b: int) -> str:
    return f"{min(a, b)}-{max(a, b)}"


def p2p_supported(inventory: Optional[GpuInventory] = None) -> Optional[bool]:
    """Whether every pair of visible GPUs can talk peer-to-peer: False as soon as one pair
    cannot, True when every pair is known to, None otherwise (fewer than 2 GPUs, unknown).
    The launch sets NCCL_P2P_DISABLE on False (Kaggle's 2x T4 and many consumer cards:
    NCCL hangs or fails there without it); ``env`` reports the same answer.

    Example::

        p2p_supported()            # asks NVML now
        p2p_supported(inventory)   # from an inventory already taken
    """
    inventory = gpu_inventory() if inventory is None else inventory
    if any(ok is False for ok in inventory.p2p.values()):
        return False
    visible = inventory.visible
    every_pair = {_pair(a, b) for i, a in enumerate(visible) for b in visible[i + 1:]}
    if not every_pair or not every_pair <= set(inventory.p2p):
        return None
    return True


def parse_p2p_pairs(text: str) -> dict:
    """``nvidia-smi topo -p2p r`` as {"i-j": ok} for every pair of GPUs it shows."""
    pairs = {}
    for line in text.splitlines():
        cells = line.split()
        if len(cells) < 2 or not cells[0].startswith("GPU") or not cells[0][3:].isdigit():
            continue
        row = int(cells[0][3:])
        for column, cell in enumerate(cells[1:]):
            if cell in P2P_VERDICTS and column != row:
                pairs[_pair(row, column)] = pairs.get(_pair(row, column), True) and P2P_VERDICTS[cell]
    return pairs


def parse_p2p_matrix(text: str) -> Optional[bool]:
    """Whether every pair in an ``nvidia-smi topo -p2p r`` matrix is OK (None: no matrix)."""
    pairs = parse_p2p_pairs(text)
    return all(pairs.values()) if pairs else None


def _query_machine() -> GpuInventory:
    """What the driver says about every GPU (CUDA_VISIBLE_DEVICES not applied yet)."""
    inventory = _from_nvml()
    if inventory.source == "none":
        fallback = _from_nvidia_smi()
        if fallback.source != "none" or not inventory.error:
            inventory = fallback
    return inventory


def _from_nvml() -> GpuInventory:
    try:
        nvml = ctypes.CDLL(NVML_LIBRARY)
    except OSError:
        return GpuInventory()
    try:
        return _query_nvml(nvml)
    except AttributeError as exc:  # a driver too old for one of the calls: nvidia-smi may still work
        return GpuInventory(error=f"NVML lacks {exc}")


def _query_nvml(nvml) -> GpuInventory:
    if nvml.nvmlInit_v2() != 0:
        return GpuInventory(error="NVML is installed but did not initialize (driver not loaded?)")
    try:
        buffer = ctypes.create_string_buffer(96)
        driver = buffer.value.decode() if nvml.nvmlSystemGetDriverVersion(buffer, 96) == 0 else ""
        count = ctypes.c_uint(0)
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return GpuInventory(source="nvml", driver=driver, error="NVML could not count the GPUs")
        handles, gpus = [], []
        for index in range(count.value):
            handle = ctypes.c_void_p()
            if nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
                continue
            handles.append((index, handle))
            gpus.append(GpuInfo(_nvml_string(nvml.nvmlDeviceGetName, handle), _nvml_capability(nvml, handle),
                                index, _nvml_string(nvml.nvmlDeviceGetUUID, handle),
                                _nvml_memory_mib(nvml, handle), _nvml_mig_uuids(nvml, handle)))
        return GpuInventory(source="nvml", driver=driver, gpus=tuple(gpus), p2p=_nvml_p2p(nvml, handles))
    finally:
        nvml.nvmlShutdown()


def _nvml_p2p(nvml, handles: list) -> dict:
    pairs = {}
    for a, handle_a in handles:
        for b, handle_b in handles:
            if a < b:
                status = ctypes.c_int(-1)
                if nvml.nvmlDeviceGetP2PStatus(handle_a, handle_b, NVML_P2P_CAPS_INDEX_READ,
                                               ctypes.byref(status)) == 0:
                    pairs[_pair(a, b)] = status.value == NVML_P2P_STATUS_OK
    return pairs


def _nvml_string(getter, handle) -> str:
    buffer = ctypes.create_string_buffer(96)
    return buffer.value.decode(errors="replace") if getter(handle, buffer, 96) == 0 else ""


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def _nvml_memory_mib(nvml, handle) -> Optional[int]:
    memory = _NvmlMemory()
    if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) != 0:
        return None
    return memory.total // 2**20


def _nvml_capability(nvml, handle) -> Optional[float]:
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    if nvml.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor)) != 0:
        return None
    return float(f"{major.value}.{minor.value}")


def _nvml_mig_uuids(nvml, handle) -> tuple:
    """UUIDs of the GPU's MIG instances; () when MIG is off or this NVML cannot say."""
    slots = ctypes.c_uint(0)
    try:
        if nvml.nvmlDeviceGetMaxMigDeviceCount(handle, ctypes.byref(slots)) != 0:
            return ()
        uuids = []
        for slot in range(slots.value):
            mig = ctypes.c_void_p()
            if nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot, ctypes.byref(mig)) == 0:
                uuids.append(_nvml_string(nvml.nvmlDeviceGetUUID, mig))
        return tuple(uuid for uuid in uuids if uuid)
    except AttributeError:  # a driver older than MIG
        return ()


def _nvidia_smi(*args: str) -> tuple:
    """(stdout, error): stdout is None when nvidia-smi is missing or failed."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, ""
    try:
        done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"nvidia-smi failed: {exc}"
    if done.returncode != 0:
        return None, f"nvidia-smi failed: {(done.stderr or done.stdout).strip()[:200]}"
    return done.stdout, ""


def _from_nvidia_smi() -> GpuInventory:
    out, error = _nvidia_smi("--query-gpu=index,name,memory.total,uuid,driver_version,compute_cap",
                             "--format=csv,noheader,nounits")
    if out is None:
        return GpuInventory(error=error)
    gpus, driver = [], ""
    for line in out.strip().splitlines():
        fields = [part.strip() for part in line.split(",")]
        if len(fields) < 5 or not fields[0].isdigit():
            continue
        memory = int(fields[2]) if fields[2].isdigit() else None
        try:
            capability = float(fields[5]) if len(fields) > 5 else None
        except ValueError:
            capability = None
        gpus.append(GpuInfo(fields[1], capability, int(fields[0]), fields[3], memory))
        driver = fields[4]
    matrix, _ = _nvidia_smi("topo", "-p2p", "r") if len(gpus) > 1 else ("", "")
    return GpuInventory(source="nvidia-smi", driver=driver, gpus=tuple(gpus), p2p=parse_p2p_pairs(matrix or ""))


def cuda_device_count(inventory: Optional[GpuInventory] = None) -> int:
    """Visible CUDA devices, from the inventory (NVML or nvidia-smi): torch's own
    fallback, cudaGetDeviceCount, would initialize the driver here and spoil later forks."""
    if not torch.backends.cuda.is_built():
        return 0
    inventory = gpu_inventory() if inventory is None else inventory
    if inventory.source != "none":
        return len(inventory.visible)
    try:
        return torch.cuda.device_count()  # no NVML, no nvidia-smi: nothing safer left
    except Exception:  # broken driver: behave like a CPU machine
        return 0


def cuda_initialized() -> bool:
    return torch.cuda.is_initialized()  # False on a CPU build; never initializes anything


# ----------------------------------------------------------------- who initialized CUDA
_first_cuda_init: list = []   # [the stack of this process's first CUDA initialization], once it happened
_OUR_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _record_cuda_init() -> None:
    """Run by torch inside its lazy CUDA initialization (a queued call, see `watch_cuda_init`):
    keeps the stack that led there. Frames only, no source read: microseconds, once."""
    try:
        if not _first_cuda_init:
            stack = traceback.StackSummary.extract(traceback.walk_stack(sys._getframe(1)), lookup_lines=False)
            stack.reverse()
            _first_cuda_init.append(stack)
    except Exception:  # torch would turn an exception here into a failed CUDA initialization
        pass


def watch_cuda_init() -> None:
    """Have torch call `_record_cuda_init` when it initializes CUDA in this process.

    torch runs the calls queued with ``torch.cuda._lazy_call`` inside ``_lazy_init``, the
    one door every CUDA use goes through (a tensor on a GPU, ``.cuda()``, ``set_device``...),
    with the Python stack of the code that caused it still there. Queuing costs one
    list append (and torch's own formatting of this import's stack); nothing runs
    until CUDA is initialized, and nothing here initializes it. If CUDA is already
    initialized it is too late to know where: nothing is queued (a queued call would
    run at once and record this import instead).
    """
    lazy_call = getattr(torch.cuda, "_lazy_call", None)
    if lazy_call is not None and not torch.cuda.is_initialized():
        lazy_call(_record_cuda_init)


def cuda_init_origin() -> str:
    """What initialized CUDA in this process, for a person, or "" when nothing is known.

    Example::

        x = torch.ones(1, device="cuda")    # in cell In[3], line 2
        cuda_init_origin()   # "cell In[3], line 2: x = torch.ones(1, device=\"cuda\")"
    """
    if _first_cuda_init:
        return describe_init_stack(_first_cuda_init[0])
    imported = cuda_libraries_imported()
    if imported:
        return f"{', '.join(imported)} (imported here; known to initialize CUDA when imported)"
    return ""


def describe_init_stack(stack: list) -> str:
    """The code that caused a CUDA initialization, from its stack (outermost frame first):
    the innermost frame outside torch and this package, and when that frame is in an
    installed library, the user's line that called into it.

    Example::

        describe_init_stack(traceback.extract_stack())   # "train.py:12: model.cuda()"
    """
    frames = [f for f in reversed(stack) if not f.filename.startswith((_TORCH_DIR, _OUR_DIR))
              and not f.filename.startswith("<frozen ")]
    if not frames:
        return ""
    first = frames[0]
    user = next((f for f in frames if not _in_library(f.filename)), None)
    if user is None or user is first:
        return _frame_text(first)
    return f"{_location(first)}, called from {_frame_text(user)}"


def _frame_text(frame) -> str:
    line = (frame.line or "").strip()
    return f"{_location(frame)}: {line}" if line else _location(frame)


def _location(frame) -> str:
    """``cell In[3], line 2`` for a notebook cell, else ``path:line``."""
    shell = ipython_shell()
    try:
        label = shell.compile.format_code_name(frame.filename) if shell is not None else None
    except Exception:
        label = None
    if label:
        return f"{label[0].lower()} {label[1]}, line {frame.lineno}"
    return f"{frame.filename}:{frame.lineno}"


def _in_library(filename: str) -> bool:
    return "site-packages" in filename or "dist-packages" in filename or filename.startswith(sys.prefix + os.sep)


def cuda_libraries_imported() -> list[str]:
    """Libraries known to create a CUDA context on import that are already imported."""
    return [name for name in CUDA_ON_IMPORT_LIBRARIES if name in sys.modules]


# ----------------------------------------------------------------- the CUDA driver
def cuda_driver_initialized() -> bool:
    """Whether the CUDA driver is initialized in this process, whoever did it.

    torch's flag (`cuda_initialized`) sees only torch's own initialization; cupy, numba,
    JAX or Triton's backend probe call ``cuInit`` without torch knowing, and a rank forked
    after that crashes or hangs on its first CUDA call. The driver knows: before ``cuInit``,
    ``cuDeviceGetCount`` returns CUDA_ERROR_NOT_INITIALIZED, after it CUDA_SUCCESS. Nobody
    can have called ``cuInit`` without the driver's library loaded, so the probe runs only
    when ``libcuda.so`` is already mapped in this process: it never loads the driver here,
    and the query itself initializes nothing.

    Example::

        import cupy                       # initializes the driver
        cuda_driver_initialized()         # True, while torch.cuda.is_initialized() is False
    """
    path = loaded_library(CUDA_DRIVER_LIBRARY)
    if path is None:
        return False
    try:
        driver = ctypes.CDLL(path)   # the copy already loaded: dlopen returns its handle
        count = ctypes.c_int(0)
        return driver.cuDeviceGetCount(ctypes.byref(count)) == CUDA_SUCCESS
    except (OSError, AttributeError):   # not a CUDA driver after all
        return False


def loaded_library(prefix: str) -> Optional[str]:
    """The path of a shared library mapped in this process whose file name starts with
    ``prefix`` (``/proc/self/maps``), or None."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            data = maps.read()
    except OSError:
        return None
    needle = ("/" + prefix).encode()
    at = data.find(needle)   # one scan of the bytes: a launch pays microseconds, not a parse of every line
    while at != -1:
        start, end = data.rfind(b" ", 0, at) + 1, data.find(b"\n", at)
        path = data[start:end if end != -1 else len(data)].decode(errors="replace")
        if path.startswith("/") and os.path.basename(path).startswith(prefix):
            return path
        at = data.find(needle, at + 1)
    return None


def driver_init_origin() -> str:
    """Which libraries imported here may have initialized the CUDA driver, for a person.

    Example::

        driver_init_origin()   # "cupy (imported here)"
    """
    imported = [name for name in CUDA_DRIVER_LIBRARIES if name in sys.modules and not _held_by_torch(name)] \
        or _modules_holding_the_driver()
    if imported:
        return f"{', '.join(imported)} (imported here)"
    return "a library imported here, not torch (cupy, numba, JAX and Triton are known to)"


def _held_by_torch(package: str) -> bool:
    """torch's own modules hold ``package``: it came with torch and tells nothing (torch's CUDA
    builds from 2.14 import cuda-python's bindings, ``cuda``, at ``import torch``)."""
    prefix = package + "."
    for name, module in list(sys.modules.items()):
        if name != "torch" and not name.startswith("torch."):
            continue
        try:
            values = list(vars(module).values())
        except TypeError:
            continue
        # type(), not isinstance: some module globals warn when their __class__ is read
        if any(issubclass(type(value), types.ModuleType) and (getattr(value, "__name__", "") + ".").startswith(prefix)
               for value in values):
            return True
    return False


def _modules_holding_the_driver() -> list:
    """Modules that keep the driver's library as a ctypes handle in their globals (code
    that calls ``cuInit`` through ctypes): named when no known library is imported. Only
    asked once the driver is found initialized."""
    found = []
    for name, module in list(sys.modules.items()):
        try:
            values = list(vars(module).values())
        except TypeError:
            continue
        # type(), not isinstance: some module globals warn when their __class__ is read
        if any(issubclass(type(value), ctypes.CDLL) and os.path.basename(str(getattr(value, "_name", ""))).startswith(
                CUDA_DRIVER_LIBRARY) for value in values):
            found.append(name)
    return [name for name in found if name != __name__][:3]


# ----------------------------------------------------------------- /dev/shm
def shm_bytes(path: str = SHM_PATH) -> Optional[int]:
    """The size of the shared-memory filesystem (NCCL's intra-node transport and DataLoader
    workers pass tensors through it), or None where there is none."""
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return stat.f_blocks * stat.f_frsize


# ----------------------------------------------------------------- the rest
def usable_cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def ipython_shell() -> Optional[object]:
    """The running IPython shell, or None (never imports IPython itself)."""
    if "IPython" not in sys.modules:
        return None
    try:
        return sys.modules["IPython"].get_ipython()
    except Exception:
        return None


def in_jupyter_kernel() -> bool:
    shell = ipython_shell()
    return shell is not None and getattr(shell, "kernel", None) is not None


def platform() -> str:
    if in_colab():
        return "colab"
    if in_kaggle():
        return "kaggle"
    if in_jupyter_kernel():
        return "jupyter"
    if ipython_shell() is not None:
        return "ipython"
    return "python"


# ----------------------------------------------------------------- the front end
VSCODE_MARKERS = ("VSCODE_PID", "VSCODE_CWD", "VSCODE_IPC_HOOK_CLI")   # set in every process VS Code starts
JUPYTER_SERVER_MARKER = "JPY_SESSION_NAME"   # jupyter_server 2 sets it for the kernels it starts


def in_colab(environ=None) -> bool:
    """Colab: its ``google.colab`` package is importable (looked up, not imported), or its
    runtime's variable is set."""
    environ = os.environ if environ is None else environ
    if "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in environ:
        return True
    import importlib.util

    try:
        return importlib.util.find_spec("google.colab") is not None
    except (ImportError, ValueError):   # no "google" package, or a broken one
        return False


def in_kaggle(environ=None) -> bool:
    environ = os.environ if environ is None else environ
    return "KAGGLE_KERNEL_RUN_TYPE" in environ or any(key.startswith("KAGGLE_KERNEL") for key in environ)


def frontend(environ=None) -> str:
    """Which front end shows this process's output, from each one's own markers:

    - ``"colab"``: ``google.colab`` importable (or ``COLAB_RELEASE_TAG``);
    - ``"kaggle"``: ``KAGGLE_KERNEL_RUN_TYPE`` (Kaggle's notebooks set it);
    - ``"vscode"``: ``VSCODE_PID`` (or another variable VS Code sets in the processes it
      starts) in a kernel: VS Code's notebooks;
    - ``"jupyter-server"``: a kernel started by a Jupyter server (JupyterLab, Notebook 7,
      JupyterHub, Binder), which sets ``JPY_SESSION_NAME``;
    - ``"kernel"``: another Jupyter client (nbclient and papermill, the classic Notebook 6,
      Spyder, qtconsole, ...): a kernel with none of the markers above;
    - ``"ipython"``: terminal IPython; ``"script"``: plain Python (outside a kernel, the
      markers do not count: a script run with ``!python train.py`` writes text).

    The first match wins, in that order: a JupyterLab started from VS Code's terminal
    inherits ``VSCODE_PID`` and counts as VS Code (whose choice, the html view, renders
    in JupyterLab too).

    Example::

        frontend()   # "jupyter-server" in JupyterLab, "colab" on Colab
    """
    environ = os.environ if environ is None else environ
    if not in_jupyter_kernel():   # a script run from a notebook's shell escape (!python x.py) too
        return "ipython" if ipython_shell() is not None else "script"
    if in_colab(environ):
        return "colab"
    if in_kaggle(environ):
        return "kaggle"
    if any(key in environ for key in VSCODE_MARKERS):
        return "vscode"
    if JUPYTER_SERVER_MARKER in environ:
        return "jupyter-server"
    return "kernel"


watch_cuda_init()
