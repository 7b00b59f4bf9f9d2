"""A first look at SKAB valve1: per file, fit on the first 400 rows, replay the whole file
through the detection engine, count labelled stretches that raised an alert and alerts that
fall outside every labelled stretch.

    python -m bench.skab_valve1    (data: ../shared/data/skab, or PLANTWATCH_SKAB_DIR)

`plantwatch evaluate` and `bench/skab.py` give the full benchmark; this is the quick check.
"""
import os
from pathlib import Path
import glob, json, time
from pipeline.settings import load_settings
from pipeline.tables import read_table, frame_to_batch, timestamps_ms
from pipeline.fit import fit_bundle
from pipeline.engine import DetectionEngine
from pipeline.quality_metrics import ranges_from_labels
SKAB = Path(os.environ.get("PLANTWATCH_SKAB_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "skab"))
F=("Accelerometer1RMS","Accelerometer2RMS","Current","Pressure","Temperature","Thermocouple","Voltage","Volume Flow RateRMS")
s=load_settings(env={}, overrides={"model.features":",".join(F),"model.timesteps":"16","model.chunks_per_run":"4","model.streams":"16","log.level":"warning"})
tot=dict(ranges=0,found=0,alerts=0,outside=0); t0=time.time()
for path in sorted(glob.glob(str(SKAB / "valve1" / "*.csv")), key=lambda p:int(p.split('/')[-1][:-4])):
    df=read_table(path); ts=timestamps_ms(df["datetime"]); lab=df["anomaly"].to_numpy().astype(int)
    b,_=fit_bundle(frame_to_batch(df.iloc[:400],F,ts_col="datetime"), s)
    eng=DetectionEngine(b, s.grid)
    ev=eng.process(frame_to_batch(df,F,ts_col="datetime")).events+eng.flush().events
    spans=[(e.start_ms, e.end_ms if e.end_ms is not None else ts[-1]+1) for e in ev if e.state=="close"]
    spans+=[(e.start_ms, ts[-1]+1) for e in ev if e.state=="open" and not any(c.alert_id==e.alert_id for c in ev if c.state=="close")]
    rngs=[(ts[a], ts[b-1]+1) for a,b in ranges_from_labels(lab)]
    found=sum(any(s0<r1 and s1>r0 for s0,s1 in spans) for r0,r1 in rngs)
    outside=sum(not any(s0<r1 and s1>r0 for r0,r1 in rngs) for s0,s1 in spans)
    print(path.split('/')[-1], "stretches", len(rngs), "alerted", found, "alerts", len(spans), "outside", outside, flush=True)
    for k,v in (("ranges",len(rngs)),("found",found),("alerts",len(spans)),("outside",outside)): tot[k]+=v
print("TOTAL", json.dumps(tot), "seconds", round(time.time()-t0))
