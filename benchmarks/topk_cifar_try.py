"""Issue 11 (WIP): TopK on CIFAR-10 / ResNet20 default keys, FAISS exact. python benchmarks/topk_cifar_try.py DATA_DIR OUT.json"""
import json
import sys
import time
from cacheviz.config import Setup
from cacheviz.topk import TopK
t0 = time.time()
rows = TopK(Setup(dataset="cifar10", model="resnet20"), ks=(1, 3, 10, 30, 100, 300, 1000, 3000, 10000), index="exact").run(sys.argv[1], "cpu")
json.dump(rows, open(sys.argv[2], "w"), indent=1)
for r in rows: print(json.dumps({k: r[k] for k in ("k","accuracy","cache_only_accuracy","exact_accuracy","exact_cache_only_accuracy","ms_per_query","theta","lam")}))
print("seconds", time.time() - t0)
