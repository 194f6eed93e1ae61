#!/usr/bin/env python3
"""Lists which modules of crates/agent/src each module names (crate::X paths, tests left out) and any cycle among them. Run from the workspace root: python3 scripts/module-cycles.py"""
import re,os,sys,itertools
root="crates/agent/src"
mods={}
for f in os.listdir(root):
    p=os.path.join(root,f)
    if f.endswith('.rs') and f!='lib.rs': mods[f[:-3]]=[p]
    elif os.path.isdir(p): mods[f]=[os.path.join(p,x) for x in os.listdir(p) if x.endswith('.rs')]
g={m:set() for m in mods}
for m,files in mods.items():
    for f in files:
        txt=open(f).read()
        txt=re.sub(r'#\[cfg\(test\)\]\s*mod tests\s*\{.*','',txt,flags=re.S)
        for r in re.findall(r'crate::(\w+)',txt):
            if r in mods and r!=m: g[m].add(r)
for m in sorted(g): print(f"{m:12} -> {', '.join(sorted(g[m]))}")
# cycles via DFS
cyc=[]
def dfs(n,path):
    for x in g[n]:
        if x in path: cyc.append(path[path.index(x):]+[x])
        elif len(path)<12: dfs(x,path+[x])
for m in g: dfs(m,[m])
print("cycles:", sorted(set(' -> '.join(c) for c in cyc)) or "none")
sys.exit(1 if cyc else 0)
