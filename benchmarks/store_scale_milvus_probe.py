"""Issue 11 probe: is Milvus Lite's slow single query a background build? (n x 512 synthetic keys of store_scale.py)

    python benchmarks/store_scale_milvus_probe.py 200000

Inserts, flushes, builds IVF_FLAT (nlist 1024), loads; lists the files on disk (data .parquet, index .idx);
times 50 single top-10 queries (nprobe 16) right after load and again after 60 s idle; prints describe_index.
"""
import sys, time, tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import store_scale as s
from pymilvus import MilvusClient, DataType
n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
x = s.synthetic_keys(n, 512, 0); q = s.synthetic_keys(200, 512, 0, stream=1)
folder = Path(tempfile.mkdtemp(prefix="probe-milvus-", dir="/tmp"))
c = MilvusClient(str(folder / "store.db"))
sc = c.create_schema(auto_id=False, enable_dynamic_field=False)
sc.add_field("id", DataType.INT64, is_primary=True); sc.add_field("vector", DataType.FLOAT_VECTOR, dim=512)
c.create_collection("keys", schema=sc)
for a in range(0, n, 5000):
    c.insert("keys", [{"id": i, "vector": v} for i, v in zip(range(a, a + 5000), x[a:a + 5000].tolist())])
c.flush("keys")
def files(): 
    fs = [f for f in folder.rglob("*") if f.is_file()]
    kinds = {}
    for f in fs: kinds[f.suffix] = kinds.get(f.suffix, 0) + 1
    return kinds
print("after flush", files(), flush=True)
ip = c.prepare_index_params(); ip.add_index(field_name="vector", index_type="IVF_FLAT", metric_type="IP", params={"nlist": 1024})
t = time.perf_counter(); c.create_index("keys", ip); print("create_index s", time.perf_counter() - t)
t = time.perf_counter(); c.load_collection("keys"); print("load s", time.perf_counter() - t, files(), flush=True)
def lat(tag):
    ts = []
    for v in q[:50]:
        t0 = time.perf_counter(); c.search("keys", [v.tolist()], limit=10, search_params={"params": {"nprobe": 16}}); ts.append(1e3 * (time.perf_counter() - t0))
    ts.sort(); print(tag, "p50 ms", round(ts[25], 1), "p95", round(ts[47], 1), files(), flush=True)
lat("right after load")
time.sleep(60); lat("after 60 s idle")
print(c.describe_index("keys", "vector"))
try:
    print(c.get_collection_stats("keys"))
except Exception as e: print(e)
c.close()
import shutil; shutil.rmtree(folder)
