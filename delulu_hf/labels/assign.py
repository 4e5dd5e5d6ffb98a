"""Assignment: encoder-rate features ``(frames, dim)`` in, nearest-centroid ids ``(frames,)`` out.

A chunked torch distance argmin on any device that returns what ``MiniBatchKMeans.predict`` does
(the same ``||c||^2 - 2 x.c`` ranking, near-ties settled in float64), without scikit-learn's
per-call overhead, so labelling keeps up with the teacher on GPU and on CPU.
"""

from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch

__all__ = ["ClusterAssigner"]


class ClusterAssigner:
    """Nearest-centroid assignment on any device, with ``MiniBatchKMeans.predict``'s arithmetic.

    Like scikit-learn, it ranks ``||c||^2 - 2 x.c`` (``||x||^2`` is constant per row) and takes
    the first minimum. Different BLAS libraries round differently, so rows whose best and second
    best float32 distances lie within ``tie_tolerance`` of each other (relative to
    ``||x||^2 + max ||c||^2``) are re-ranked in float64; the result is the exact nearest centroid,
    which is what ``predict`` returns whenever its own rounding does not flip a near-tie. Exact
    ties (equal centroids) go to the lowest index.

    On GPU the distances are one large GEMM per ``chunk_size`` rows. On CPU, like scikit-learn,
    small chunks (``cpu_chunk_size``) are spread over a thread pool with one GEMM each, which avoids
    the synchronisation of one multi-threaded GEMM; the GEMM goes through oneDNN when torch has it
    (it uses the CPU's widest vector units whatever the vendor), else ``torch.addmm``.

    Args:
        centroids: ``(k, dim)`` tensor.
        device: where the distances run (the features' device by default).
        chunk_size: rows per distance matrix on GPU, bounding memory at ``chunk_size * k`` floats.
        cpu_chunk_size: rows per task on CPU.
        tie_tolerance: relative gap below which a row is re-ranked in float64.
    """

    def __init__(
        self,
        centroids: torch.Tensor,
        device: Union[str, torch.device, None] = None,
        chunk_size: int = 16384,
        cpu_chunk_size: int = 2048,
        tie_tolerance: float = 1e-5,
    ):
        # float32 for the GEMM, the given precision (float64 as fitted) for deciding near-ties.
        self.centroids64 = centroids.detach().double()
        self.centroids = centroids.detach().float()
        if device is not None:
            self.centroids = self.centroids.to(device)
        self.chunk_size = chunk_size
        self.cpu_chunk_size = cpu_chunk_size
        self.tie_tolerance = tie_tolerance
        self._cache: dict[torch.device, dict[str, Any]] = {}

    def _on(self, device: torch.device) -> dict[str, Any]:
        if device not in self._cache:
            c = self.centroids.to(device).contiguous()
            c64 = self.centroids64.to(device).contiguous()
            cache = {"c": c, "c_sq": (c * c).sum(1), "c64": c64, "c64_sq": (c64 * c64).sum(1), "dnn": None}
            cache["c_sq_max"] = cache["c_sq"].max()
            if device.type == "cpu" and torch.backends.mkldnn.is_available():
                try:
                    weight = (-2.0 * c).to_mkldnn()
                    probe = torch.randn(3, c.shape[1])
                    got = torch._C._nn.mkldnn_linear(probe.to_mkldnn(), weight, cache["c_sq"]).to_dense()
                    want = torch.addmm(cache["c_sq"], probe, c.T, beta=1.0, alpha=-2.0)
                    if torch.allclose(got, want, rtol=1e-4, atol=1e-3 * float(want.abs().max())):
                        cache["dnn"] = weight
                except (RuntimeError, AttributeError):  # a torch build without oneDNN linear
                    cache["dnn"] = None
            self._cache[device] = cache
        return self._cache[device]

    def _assign(self, x: torch.Tensor, cache: dict[str, Any]) -> torch.Tensor:
        """Labels of one chunk ``(m, dim)`` float32."""
        if cache["dnn"] is not None:
            dist = torch._C._nn.mkldnn_linear(x.to_mkldnn(), cache["dnn"], cache["c_sq"]).to_dense()
        else:
            dist = torch.addmm(cache["c_sq"], x, cache["c"].T, beta=1.0, alpha=-2.0)
        if dist.shape[1] == 1:
            return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        # The two smallest distances: the first is the label unless the gap is within rounding, and
        # then the float64 pass below decides (so topk's order among near-equal values never matters).
        best2 = dist.topk(2, dim=1, largest=False)
        labels = best2.indices[:, 0]
        scale = torch.linalg.vector_norm(x, dim=1).square() + cache["c_sq_max"]
        ambiguous = (best2.values[:, 1] - best2.values[:, 0]) <= self.tie_tolerance * scale
        if bool(ambiguous.any()):
            x64 = x[ambiguous].double()
            exact = torch.addmm(cache["c64_sq"], x64, cache["c64"].T, beta=1.0, alpha=-2.0)
            # Equal centroids can still differ in the last bit of a GEMM: distances within float64
            # rounding are a tie, and a tie goes to the lowest index, deterministically.
            slack = 1e-12 * ((x64 * x64).sum(1, keepdim=True) + cache["c64_sq"].max())
            labels[ambiguous] = (exact <= exact.min(1, keepdim=True).values + slack).int().argmax(1)
        return labels

    @torch.inference_mode()
    def __call__(self, features: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
        """``(num_frames, dim)`` -> ``(num_frames,)`` int64 cluster ids on the features' device."""
        if isinstance(features, np.ndarray):
            features = torch.from_numpy(features)
        if features.ndim != 2 or features.shape[1] != self.centroids.shape[1]:
            raise ValueError(
                f"expected (frames, {self.centroids.shape[1]}) features, got {tuple(features.shape)}"
            )
        device = features.device if self.centroids.device.type == "cpu" else self.centroids.device
        cache = self._on(device)
        chunk = self.cpu_chunk_size if device.type == "cpu" else self.chunk_size
        starts = range(0, features.shape[0], chunk)

        def run(start: int) -> torch.Tensor:
            x = features[start : start + chunk].to(device=device, dtype=torch.float32).contiguous()
            return self._assign(x, cache)

        workers = torch.get_num_threads() if device.type == "cpu" else 1
        if workers > 1 and len(starts) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(workers, len(starts))) as pool:
                parts = list(pool.map(run, starts))
        else:
            parts = [run(start) for start in starts]
        if not parts:
            return torch.empty(0, dtype=torch.long, device=device)
        return torch.cat(parts)
