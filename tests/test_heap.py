import resource

import pytest
import torch

from lowbit import heap


def _faults_of(fn) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _churn():
    for _ in range(8):  # what a calibration forward does: large tensors made, used, freed
        t = torch.empty(16 * 2**20)  # 64 MiB, above glibc's largest mmap threshold
        t.fill_(1.0)
        del t


@pytest.mark.skipif(not heap.available(), reason="needs glibc")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    outside = _faults_of(_churn)
    with heap.reuse_freed_memory():
        _churn()  # the first tensor faults its pages in once
        inside = _faults_of(_churn)
    pages = 64 * 2**20 // resource.getpagesize()
    assert outside >= 4 * pages  # each fresh mmap is faulted in again
    assert inside < pages // 4


@pytest.mark.skipif(not heap.available(), reason="needs glibc")
def test_an_inner_exit_keeps_the_outer_setting():
    with heap.reuse_freed_memory():
        with heap.reuse_freed_memory():
            pass
        _churn()
        assert _faults_of(_churn) < 64 * 2**20 // resource.getpagesize() // 4


def test_usable_without_glibc(monkeypatch):
    monkeypatch.setattr(heap, "_LIBC", None)
    with heap.reuse_freed_memory():
        assert torch.ones(3).sum() == 3
