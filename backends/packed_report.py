"""Size report of a packed file: per layer and in total, against the fp32 state_dict."""
from __future__ import annotations

import io
import zipfile
from typing import Any

import torch

ROLES = ("values", "index", "codebook", "overhead")


def fp32_state_dict_bytes(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(bytes of ``torch.save`` of the state_dict in fp32, bytes of that file zipped)."""
    fp32 = {k: (v.detach().float() if v.is_floating_point() else v.detach()) for k, v in state.items()}
    raw = io.BytesIO()
    torch.save(fp32, raw)
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("model.pt", raw.getvalue())
    return raw.getbuffer().nbytes, zipped.getbuffer().nbytes


def build_report(rows: list[dict[str, Any]], file_bytes: int, manifest_bytes: int,
                 state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``rows``: one per tensor (name, numel, kind, and bytes per role). Layers group a module's
    tensors; bits per weight count every byte a layer's tensors take, over its element count."""
    layers: dict[str, dict[str, Any]] = {}
    for row in rows:
        layer_name = row["name"].rpartition(".")[0] or "<root>"
        layer = layers.setdefault(layer_name, {"layer": layer_name, "params": 0, "kinds": [],
                                               **{f"{r}_bytes": 0 for r in ROLES}})
        layer["params"] += row["numel"]
        if row["kind"] not in layer["kinds"]:
            layer["kinds"].append(row["kind"])
        for role in ROLES:
            layer[f"{role}_bytes"] += row.get(role, 0)
    for layer in layers.values():
        n = max(1, layer["params"])
        total = sum(layer[f"{r}_bytes"] for r in ROLES)
        layer["bytes"] = total
        layer["bits_per_weight"] = round(8 * total / n, 3)
        layer["index_bits_per_weight"] = round(8 * layer["index_bytes"] / n, 3)
        layer["codebook_bits_per_weight"] = round(8 * layer["codebook_bytes"] / n, 3)
        layer["kinds"] = "+".join(layer["kinds"])
    fp32_bytes, fp32_zip_bytes = fp32_state_dict_bytes(state)
    params = sum(r["numel"] for r in rows)
    totals = {"params": params, "file_bytes": file_bytes, "manifest_bytes": manifest_bytes,
              "tensor_bytes": sum(l["bytes"] for l in layers.values()),
              "bits_per_weight": round(8 * file_bytes / max(1, params), 3),
              "fp32_state_dict_bytes": fp32_bytes, "fp32_state_dict_zip_bytes": fp32_zip_bytes,
              "ratio_vs_fp32": round(fp32_bytes / file_bytes, 2),
              "ratio_vs_fp32_zip": round(fp32_zip_bytes / file_bytes, 2)}
    for role in ROLES:
        totals[f"{role}_bytes"] = sum(l[f"{role}_bytes"] for l in layers.values())
    return {"layers": list(layers.values()), "totals": totals}


def size_table(report: dict[str, Any], min_params: int = 0) -> str:
    """The report as a fixed-width table (layers with at least ``min_params`` elements)."""
    head = f"{'layer':<28} {'params':>9} {'encoding':<20} {'bits/w':>7} {'index b/w':>9} {'book b/w':>8} {'bytes':>9}"
    lines = [head, "-" * len(head)]
    for layer in report["layers"]:
        if layer["params"] < min_params:
            continue
        lines.append(f"{layer['layer'][:28]:<28} {layer['params']:>9} {layer['kinds'][:20]:<20} "
                     f"{layer['bits_per_weight']:>7.3f} {layer['index_bits_per_weight']:>9.3f} "
                     f"{layer['codebook_bits_per_weight']:>8.3f} {layer['bytes']:>9}")
    t = report["totals"]
    lines.append("-" * len(head))
    lines.append(f"file {t['file_bytes']} B ({t['bits_per_weight']:.3f} bits/weight, manifest {t['manifest_bytes']} B); "
                 f"fp32 state_dict {t['fp32_state_dict_bytes']} B -> {t['ratio_vs_fp32']:.2f}x; "
                 f"zipped {t['fp32_state_dict_zip_bytes']} B -> {t['ratio_vs_fp32_zip']:.2f}x")
    return "\n".join(lines)
