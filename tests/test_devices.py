"""A graph runs where the user's model lives: trace -> prune -> distill -> int8 -> export on the
model's device (cpu always; cuda where the machine has one), and a device graphopt cannot use is
a ConfigError naming it, never a device-mismatch traceback from torch."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt import ConfigError, PassContext, PassManager
from graphopt.app.evaluate import top1_accuracy
from graphopt.backends import onnx_int8, torchscript_int8
from graphopt.devices import autocast, module_device, resolve, to_device
from graphopt.passes import Distill, FoldBatchNorm, FoldQDQ, InsertQDQ, PruneChannels
from graphopt.tools import digits
from graphopt.training.distill import DistillConfig, distill

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine (CI is CPU-only)"))]


class TinyClassifier(nn.Module):
    """Token embedding, one fused-qkv attention block with a GELU FFN, mean pooling, a linear head."""

    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4, classes: int = 5):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn_in, self.ffn_out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        h = self.emb(ids)
        b, t, d = h.shape
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        h = self.norm1(h + self.out(a))
        h = self.norm2(h + self.ffn_out(F.gelu(self.ffn_in(h))))
        return self.head(h.mean(1))


def _token_batches():
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 50, (16, 12), generator=generator) for _ in range(6)]


@pytest.mark.parametrize("device", DEVICES)
def test_a_cnn_is_pruned_distilled_quantized_and_exported_on_its_device(device, tmp_path):
    model = digits.trained_digits_cnn().to(device)
    graph = graphopt.trace(model, next(digits.test_batches())[0][:4])   # CPU inputs: moved to the model
    assert graph.device.type == device and graph.example_inputs[0].device.type == device
    context = PassContext({"train_data": digits.train_batches, "calibration_data": digits.train_batches})
    result = PassManager([FoldBatchNorm(), PruneChannels(ratio=0.3), Distill(epochs=1, progress=False),
                          InsertQDQ(progress=False), FoldQDQ()], context=context).run(graph)
    assert [r.device.split(":")[0] for r in result.records] == [device] * 6
    assert result.graph.device.type == device
    assert result.records[2].macs < 0.75 * result.records[0].macs
    assert top1_accuracy(result.graph, digits.test_batches()) >= 0.9   # CPU batches, read on the device
    report = onnx_int8.export(result.graph, str(tmp_path / "digits.int8.onnx"))
    assert report.details["within_one_step"] >= 0.99
    assert ("exported_from" in report.details) == (device != "cpu")
    scripted = torchscript_int8.export(result.graph, str(tmp_path / "digits.int8.pt"))
    assert scripted.details["within_one_step"] >= 0.99
    assert result.graph.device.type == device        # exporting copied the graph; it did not move it


@pytest.mark.parametrize("device", DEVICES)
def test_a_transformer_loses_heads_and_is_distilled_and_exported_on_its_device(device, tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier().eval().to(device)
    data = _token_batches()
    graph = graphopt.trace(model, data[0][:4])
    context = PassContext({"train_data": lambda: data, "calibration_data": lambda: data})
    result = PassManager([PruneChannels(ratio=0.25), Distill(epochs=2, loss="mse", lr=3e-3, progress=False),
                          InsertQDQ(progress=False), FoldQDQ()], context=context).run(graph)
    assert {r.device.split(":")[0] for r in result.records} == {device}
    weights = result.graph.gm.state_dict()
    # one head of four gone from q, k and v, and 8 of the stream's 32 (its head size d // heads is read
    # from the stream at run time: it stays 8)
    assert tuple(weights["qkv.weight_int8"].shape) == (3 * 24, 24)
    assert tuple(weights["ffn_in.weight_int8"].shape) == (96, 24)
    assert weights["qkv.weight_int8"].device.type == device
    assert result.records[2].stats["loss_last"] < result.records[2].stats["loss_first"]
    report = onnx_int8.export(result.graph, str(tmp_path / "tiny.int8.onnx"))
    assert report.details["within_one_step"] >= 0.99


@pytest.mark.parametrize("device", DEVICES)
def test_pass_manager_device_runs_a_copy_there(device):
    graph = graphopt.trace(digits.trained_digits_cnn(), next(digits.test_batches())[0][:4])
    result = PassManager([FoldBatchNorm()], device=device).run(graph)
    assert result.graph.device.type == device and result.records[-1].device.startswith(device)
    assert graph.device.type == "cpu"                    # the caller's graph stays where it was
    assert result.records[-1].max_error < 1e-5


def test_bf16_autocast_trains_the_student_on_the_cpu():
    teacher = graphopt.trace(digits.trained_digits_cnn(), torch.rand(2, 1, 8, 8))
    results = {}
    for amp in (None, "bf16"):
        torch.manual_seed(0)
        student = teacher.clone()
        with torch.no_grad():
            for p in student.gm.parameters():
                p.add_(0.3 * torch.randn_like(p) * p.abs().mean())
        stats = distill(student, teacher, digits.train_batches, DistillConfig(epochs=2, lr=2e-3, amp=amp),
                        progress=False)
        assert stats["loss_last"] < stats["loss_first"]
        assert all(p.dtype == torch.float32 for p in student.gm.parameters())   # weights stay float32
        results[amp] = top1_accuracy(student, digits.test_batches())
    assert results["bf16"] >= 0.95 and abs(results["bf16"] - results[None]) <= 0.03


def test_bad_devices_and_precisions_are_named():
    with pytest.raises(ConfigError, match="'tpu9' is not a torch device name"):
        resolve("tpu9")
    with pytest.raises(ConfigError, match="meta.*holds no values"):
        resolve("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device 'cuda': CUDA is not available here"):
            PassManager([FoldBatchNorm()], device="cuda")
    with pytest.raises(ConfigError, match="amp='fp16' needs a CUDA device.*use amp='bf16'"):
        autocast(torch.device("cpu"), "fp16")
    with pytest.raises(ConfigError, match="amp must be one of bf16, fp16"):
        DistillConfig(amp="int8").check()
    with pytest.raises(ConfigError, match=r"amp.*'bf16'.*'fp16'|amp.*bf16.*fp16"):
        Distill(amp="half")


def test_a_model_without_values_is_refused_at_trace_naming_the_weight():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ConfigError, match=r"trace\(\): Sequential: '0.weight' is on the meta device"):
        graphopt.trace(model, torch.rand(2, 4))
    assert module_device(nn.ReLU()) is None


def test_batches_move_whole_and_tensors_already_there_are_not_copied():
    x = torch.rand(3)
    moved = to_device({"a": (x, [x, 1]), "b": "text"}, torch.device("cpu"))
    assert moved["a"][0] is x and moved["a"][1][0] is x and moved["a"][1][1] == 1 and moved["b"] == "text"


@pytest.mark.parametrize("device", DEVICES)
def test_a_pipeline_file_names_the_device_its_model_runs_on(device, tmp_path):
    from graphopt.app.pipeline import load_pipeline, run_pipeline

    path = tmp_path / "p.toml"
    path.write_text(f'[model]\nfactory = "graphopt.tools.digits:trained_digits_cnn"\ninput_shape = [2, 1, 8, 8]\n'
                    f'device = "{device}"\n\n[[passes]]\nname = "fold_batchnorm"\n\n'
                    f'[[backends]]\nname = "onnx"\npath = "m.onnx"\n')
    outcome = run_pipeline(load_pipeline(path), progress=False)
    assert [r.device.split(":")[0] for r in outcome.records] == [device, device]
    assert outcome.exports[0].max_rel_error < 1e-4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_a_pipeline_file_asking_for_cuda_without_one_is_refused_before_any_work(tmp_path):
    from graphopt.app.pipeline import load_pipeline

    path = tmp_path / "p.toml"
    path.write_text('[model]\nfactory = "graphopt.tools.digits:trained_digits_cnn"\ninput_shape = [2, 1, 8, 8]\n'
                    'device = "cuda:0"\n')
    with pytest.raises(ConfigError, match="model.device: device 'cuda:0': CUDA is not available here"):
        load_pipeline(path)
