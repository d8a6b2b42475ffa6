package test

import (
	"bufio"
	"context"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/ftkvm/ftkvm/vmm/api"
)

// scrape reads a /metrics page into name{labels} -> value.
func scrape(t *testing.T, addr string) map[string]float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		l := sc.Text()
		if strings.HasPrefix(l, "#") || l == "" {
			continue
		}
		i := strings.LastIndexByte(l, ' ')
		v, err := strconv.ParseFloat(l[i+1:], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", l, err)
		}
		out[l[:i]] = v
	}
	return out
}

var metricsAddrRE = regexp.MustCompile(`metrics on http://(\S+)/metrics`)

func metricsAddr(p *proc) string {
	p.t.Helper()
	var addr string
	p.waitUntil("the metrics address", func() bool {
		m := metricsAddrRE.FindStringSubmatch(p.stderr())
		if m != nil {
			addr = m[1]
		}
		return m != nil
	})
	return addr
}

// A replicated pair's metrics move while the guest runs and agree with
// ctl status; the witness serves its own.
func TestMetrics(t *testing.T) {
	requireKVM(t)
	w := workload{name: "counter", cmdline: "workload=counter lines=300 wait=4 hz=200"}
	sock := tempSocket(t)
	b := start(t, append([]string{"backup", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"}, replicaArgs(w)...)...)
	p := start(t, append([]string{"primary", "--backup", b.backupAddr(), "--api", sock, "--metrics", "127.0.0.1:0"}, replicaArgs(w)...)...)
	pm, bm := metricsAddr(p), metricsAddr(b)
	p.waitLines(3)
	first := scrape(t, pm)
	p.waitLines(strings.Count(p.stdout(), "\n") + 3)
	second := scrape(t, pm)
	st, err := api.NewClient(sock).Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	third := scrape(t, pm)
	rs := st.Replica
	for _, c := range []struct {
		name string
		ok   bool
	}{
		{"role primary", second[`ftkvm_replica_role{role="primary"}`] == 1 && second[`ftkvm_replica_role{role="backup"}`] == 0},
		{"protected", second["ftkvm_replica_protected"] == 1 && rs.Protected},
		{"link", second["ftkvm_replica_link_up"] == 1},
		{"epochs move", second["ftkvm_replica_epochs_total"] > first["ftkvm_replica_epochs_total"]},
		{"console moves", second["ftkvm_console_bytes_total"] > first["ftkvm_console_bytes_total"]},
		{"exits move", second[`ftkvm_exits_total{reason="KVM_EXIT_IO"}`] > first[`ftkvm_exits_total{reason="KVM_EXIT_IO"}`]},
		{"epochs agree with ctl status", second["ftkvm_replica_epochs_total"] <= float64(rs.Epochs) && float64(rs.Epochs) <= third["ftkvm_replica_epochs_total"]},
		{"log agrees with ctl status", second["ftkvm_replica_log_records_sent_total"] <= float64(rs.LogSent) && float64(rs.LogSent) <= third["ftkvm_replica_log_records_sent_total"]},
		{"failovers agree", third["ftkvm_replica_failovers_total"] == float64(rs.Promotions)},
		{"divergences agree", third["ftkvm_replica_divergences_total"] == float64(rs.Divergences)},
		{"no unhandled accesses", third[`ftkvm_device_unhandled_accesses_total{device="port bus"}`] == 0},
		// Every output performed was timed (read under one lock with
		// the status), and the counts agree with ctl status.
		{"outputs timed", second["ftkvm_replica_output_hold_seconds_count"] == second["ftkvm_replica_outputs_performed_total"] &&
			second["ftkvm_replica_output_hold_seconds_count"] > first["ftkvm_replica_output_hold_seconds_count"]},
		{"hold times agree with ctl status", second["ftkvm_replica_output_hold_seconds_count"] <= float64(rs.HeldOutputs) &&
			float64(rs.HeldOutputs) <= third["ftkvm_replica_output_hold_seconds_count"] && rs.HeldOutputs <= rs.Performed},
		{"hold histogram", second[`ftkvm_replica_output_hold_seconds_bucket{le="+Inf"}`] == second["ftkvm_replica_output_hold_seconds_count"] &&
			second["ftkvm_replica_output_hold_seconds_sum"] > 0},
		{"lag in records, bytes and time agree", lagAgrees(first) && lagAgrees(second) && lagAgrees(third) &&
			(rs.LagRecords == 0) == (rs.LagBytes == 0) && (rs.LagRecords == 0) == (rs.LagSeconds == 0)},
		{"no claims", third[`ftkvm_replica_claims_total{outcome="won"}`] == 0 && third[`ftkvm_replica_claims_total{outcome="lost"}`] == 0},
	} {
		if !c.ok {
			t.Errorf("%s: first %v\nsecond %v\nstatus %+v", c.name, ours(first), ours(second), rs)
		}
	}
	t.Logf("primary: lag %v records, %v bytes, %v s; %v outputs held %v s in all; ctl status: lag %d records, %d bytes, %v s, %d outputs timed",
		second["ftkvm_replica_lag_records"], second["ftkvm_replica_lag_bytes"], second["ftkvm_replica_lag_seconds"],
		second["ftkvm_replica_output_hold_seconds_count"], second["ftkvm_replica_output_hold_seconds_sum"],
		rs.LagRecords, rs.LagBytes, rs.LagSeconds, rs.HeldOutputs)
	// The backup's view: a backup, linked.
	bs := scrape(t, bm)
	if bs[`ftkvm_replica_role{role="backup"}`] != 1 || bs["ftkvm_replica_link_up"] != 1 || !lagAgrees(bs) ||
		bs["ftkvm_replica_output_hold_seconds_count"] != 0 {
		t.Errorf("backup metrics: %v", bs)
	}
	p.kill()
	b.waitUntil("the takeover", func() bool { return strings.Contains(b.stderr(), "this replica is the primary now") })
	bs = scrape(t, bm)
	if bs[`ftkvm_replica_role{role="primary"}`] != 1 || bs["ftkvm_replica_failovers_total"] != 1 || bs["ftkvm_replica_protected"] != 0 {
		t.Errorf("promoted backup metrics: %v", bs)
	}

	wit := start(t, "witness", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0")
	ws := scrape(t, metricsAddr(wit))
	for _, k := range []string{"ftkvm_witness_claims_total", "ftkvm_witness_pairs_decided_total", "ftkvm_witness_claims_failed_total"} {
		if v, ok := ws[k]; !ok || v != 0 {
			t.Errorf("witness %s = %v, %v", k, v, ok)
		}
	}
}

// lagAgrees: a scrape's lag in records, bytes and seconds are all zero or
// all not (they are read under one lock).
func lagAgrees(m map[string]float64) bool {
	r, b, s := m["ftkvm_replica_lag_records"], m["ftkvm_replica_lag_bytes"], m["ftkvm_replica_lag_seconds"]
	return (r == 0) == (b == 0) && (r == 0) == (s == 0)
}

// ours keeps ftkvm's metrics (not Go's or the process's).
func ours(m map[string]float64) map[string]float64 {
	out := map[string]float64{}
	for k, v := range m {
		if strings.HasPrefix(k, "ftkvm_") {
			out[k] = v
		}
	}
	return out
}
