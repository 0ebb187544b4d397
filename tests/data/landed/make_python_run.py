"""A Python-API run of the landed version (816a167), killed after its first generation."""
import os, signal, sys
import torch, torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset
import kecompress
import kecompress.evolution as loop
torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
gen = torch.Generator().manual_seed(123)
x = torch.randn(48, 3, 8, 8, generator=gen)
y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0].mean(dim=(1, 2)) > 0.2).long()
train = DataLoader(TensorDataset(x[:36], y[:36]), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
val = DataLoader(TensorDataset(x[36:], y[36:]), batch_size=8)
split = kecompress.split(model, "kels", 0.5, example_inputs=torch.randn(1, 3, 8, 8))
original = loop.save_json
def save_then_die(obj, path):
    original(obj, path)
    if len(obj["generations"]) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
loop.save_json = save_then_die
kecompress.Evolution(model, split, train, val, kecompress.TrainingConfig(generations=3, epochs=2, lr=0.05, seed=4),
                     run_dir=sys.argv[1]).run()
