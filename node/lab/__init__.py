"""The lab around the daemon: what runs and breaks a cluster on one machine, never on a board.

localcluster  N robustdice-node processes on loopback (or in network namespaces) with generated
              keys, peers.yaml and an operator key that signs their plan
netlab        network namespaces, veth links, tbf shaping and nftables faults (a network lab)
faults        kill / stop / restart schedules parsed from the command line
streaming     a client streaming frames at a rate through faults, recording every answer
phases        the stream's answers cut into phases (before, during, after a fault) and summarised
cluster       the `robustdice cluster` command: all of the above, as `make demo` runs it
"""
