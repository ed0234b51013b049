"""A stand-in for nvidia-ml-py's ``pynvml`` (no GPU here): the calls `notebook_launcher.gpu`
makes, answering for two Tesla T4s whose used memory grows by 1 MiB per sample. Only the
GPU's own answers are made up; everything around them is the real code.

``memory_calls`` records when each GPU's memory was asked (time.monotonic()), so a test can
check the sampling rate.
"""

import time

GPUS = [("Tesla T4", "GPU-aaaa0000-0000-0000-0000-000000000000"),
        ("Tesla T4", "GPU-bbbb1111-1111-1111-1111-111111111111")]
TOTAL = 15360 * 2**20
memory_calls: list = []
initialized = []


class NVMLError(Exception):
    pass


class _Memory:
    def __init__(self, total, used):
        self.total, self.used, self.free = total, used, total - used


class _Utilization:
    def __init__(self, gpu):
        self.gpu, self.memory = gpu, gpu // 2


def nvmlInit():
    initialized.append(time.monotonic())


def nvmlShutdown():
    pass


def nvmlDeviceGetCount():
    return len(GPUS)


def nvmlDeviceGetHandleByIndex(index):
    if not 0 <= index < len(GPUS):
        raise NVMLError("invalid argument")
    return index


def nvmlDeviceGetName(handle):
    return GPUS[handle][0]


def nvmlDeviceGetUUID(handle):
    return GPUS[handle][1]


def nvmlDeviceGetMemoryInfo(handle):
    memory_calls.append(time.monotonic())
    return _Memory(TOTAL, (5 + 2 * handle) * 2**30 + len(memory_calls) * 2**20)


def nvmlDeviceGetUtilizationRates(handle):
    return _Utilization(87 - 10 * handle)
