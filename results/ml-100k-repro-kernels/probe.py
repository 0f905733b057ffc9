"""Which float kernels / RNG paths an env setting changes: prints a JSON of per-op result hashes."""
import ctypes, glob, hashlib, json, os, sys
import numpy as np
import torch
import torch.nn.functional as F

torch.set_num_threads(1)

def h(*ts):
    m = hashlib.sha256()
    for t in ts:
        m.update(t.detach().contiguous().numpy().tobytes())
    return m.hexdigest()[:12]

out = {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
# numpy's OpenBLAS core
try:
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs", "libopenblas*"))
    lib = ctypes.CDLL(libs[0])
    for name in ("openblas_get_corename64_", "openblas_get_corename"):
        if hasattr(lib, name):
            f = getattr(lib, name); f.restype = ctypes.c_char_p; out["numpy_openblas_core"] = f().decode(); break
except Exception as e:
    out["numpy_openblas_core"] = repr(e)

ops = {}
torch.manual_seed(0)
w = torch.empty(64 * 1000); w.normal_(0, 0.02); ops["normal_init"] = h(w)
torch.manual_seed(1)
x = torch.randn(32, 50, 64, requires_grad=True)
lin = torch.nn.Linear(64, 256); lin2 = torch.nn.Linear(256, 64)
y = lin(x); ops["linear_fwd"] = h(y)
g = F.gelu(y); ops["gelu"] = h(g)
z = lin2(g); ln = F.layer_norm(z, (64,), eps=1e-12); ops["layernorm"] = h(ln)
ln.square().sum().backward(); ops["mlp_bwd"] = h(x.grad, lin.weight.grad, lin2.weight.grad)
q = torch.randn(32, 2, 50, 32, requires_grad=True); k = torch.randn(32, 2, 50, 32, requires_grad=True); v = torch.randn(32, 2, 50, 32, requires_grad=True)
a = F.scaled_dot_product_attention(q, k, v, is_causal=True); ops["sdpa_fwd"] = h(a)
a.square().sum().backward(); ops["sdpa_bwd"] = h(q.grad, k.grad, v.grad)
hid = torch.randn(1500, 64, requires_grad=True); emb = torch.randn(1683, 64, requires_grad=True) * 0.02
logits = hid @ emb[1:].t(); ops["logits_mm"] = h(logits)
tgt = torch.randint(0, 1682, (1500,))
loss = F.cross_entropy(logits, tgt); ops["cross_entropy"] = h(loss)
loss.backward(); ops["ce_bwd"] = h(hid.grad)
p = torch.nn.Parameter(torch.randn(1683, 64)); opt = torch.optim.Adam([p], lr=0.002)
p.grad = torch.randn(1683, 64); opt.step(); p.grad = torch.randn(1683, 64); opt.step(); ops["adam"] = h(p)
# dropout / bernoulli: mask and generator consumption
torch.manual_seed(2)
d = F.dropout(torch.ones(32, 50, 64), 0.3, True); after = torch.rand(4)
ops["dropout_mask"] = h(d); ops["rand_after_dropout"] = h(after)
torch.manual_seed(2)
d2 = F.dropout(torch.ones(3, 5, 7), 0.3, True); after2 = torch.rand(4)
out["bernoulli_one_draw_per_call (MKL VSL path)"] = bool(torch.equal(after, after2))
torch.manual_seed(3)
qs = [t.clone().requires_grad_() for t in (q, k, v)]
ad = F.scaled_dot_product_attention(*qs, dropout_p=0.3, is_causal=True); ops["sdpa_dropout_fwd"] = h(ad)
out["ops"] = ops
print(json.dumps(out))
