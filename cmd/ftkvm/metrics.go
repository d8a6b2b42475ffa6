package main

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/ftkvm/ftkvm/ft"
	"github.com/ftkvm/ftkvm/ft/driver"
	"github.com/ftkvm/ftkvm/ft/witness"
	"github.com/ftkvm/ftkvm/vmm"
)

// Prometheus metrics (--metrics ADDR): read when scraped, never on the
// exit path. docs/METRICS.md lists them.

// machineCollector reads a machine's counters on its vCPU thread (Do),
// giving up after a second (a backup whose vCPU waits for its log), and a
// replica's status.
type machineCollector struct {
	m *vmm.Machine
	r *driver.Replica // nil for a plain run
}

var (
	mExits       = prometheus.NewDesc("ftkvm_exits_total", "Exits of the vCPU to ftkvm, by KVM exit reason.", []string{"reason"}, nil)
	mExitSeconds = prometheus.NewDesc("ftkvm_exit_handling_seconds_total", "Time ftkvm spent handling exits, by KVM exit reason.", []string{"reason"}, nil)
	mInjected    = prometheus.NewDesc("ftkvm_interrupts_injected_total", "Interrupts injected into the guest.", nil, nil)
	mTicks       = prometheus.NewDesc("ftkvm_timer_events_total", "Timer (PIT) events delivered to the guest.", nil, nil)
	mConsole     = prometheus.NewDesc("ftkvm_console_bytes_total", "Bytes the guest wrote to its console.", nil, nil)
	mVirtual     = prometheus.NewDesc("ftkvm_virtual_time_seconds", "The guest's virtual time.", nil, nil)
	mUnhandled   = prometheus.NewDesc("ftkvm_device_unhandled_accesses_total", "Guest accesses a device does not model (devices/doc.go), by device; bus entries count accesses that reach no device.", []string{"device"}, nil)
	mStale       = prometheus.NewDesc("ftkvm_machine_counters_stale", "1 when the vCPU thread did not answer within a second and the machine's counters were not read.", nil, nil)
	mUp          = prometheus.NewDesc("ftkvm_guest_running", "1 while the guest runs.", nil, nil)

	mRole        = prometheus.NewDesc("ftkvm_replica_role", "1 for the replica's current role.", []string{"role"}, nil)
	mProtected   = prometheus.NewDesc("ftkvm_replica_protected", "1 when a primary's backup holds the guest's state.", nil, nil)
	mLink        = prometheus.NewDesc("ftkvm_replica_link_up", "1 when the link to the peer is up (handshake done).", nil, nil)
	mDiverged    = prometheus.NewDesc("ftkvm_replica_diverged", "1 while a backup waits for the repair of a divergence.", nil, nil)
	mClaiming    = prometheus.NewDesc("ftkvm_replica_claiming", "1 while the replica waits for the witness or arbiter to decide.", nil, nil)
	mFenced      = prometheus.NewDesc("ftkvm_replica_fenced", "1 once the witness or arbiter chose the peer.", nil, nil)
	mEpochs      = prometheus.NewDesc("ftkvm_replica_epochs_total", "Epochs ended (primary) or replayed (backup).", nil, nil)
	mCkptEpochs  = prometheus.NewDesc("ftkvm_replica_checkpoint_epochs_total", "Epochs ended with a checkpoint.", nil, nil)
	mCkptBytes   = prometheus.NewDesc("ftkvm_replica_checkpoint_bytes_total", "Bytes of checkpoints.", nil, nil)
	mLogSent     = prometheus.NewDesc("ftkvm_replica_log_records_sent_total", "Log records the primary sent on its current link.", nil, nil)
	mLogAcked    = prometheus.NewDesc("ftkvm_replica_log_records_acked_total", "Log records the backup acknowledged on the current link.", nil, nil)
	mLag         = prometheus.NewDesc("ftkvm_replica_lag_records", "Log records sent and not yet acknowledged (primary), or received and not yet replayed (backup).", nil, nil)
	mLagBytes    = prometheus.NewDesc("ftkvm_replica_lag_bytes", "Bytes of log records sent and not yet acknowledged (primary), or received after the last record replayed (backup).", nil, nil)
	mLagSeconds  = prometheus.NewDesc("ftkvm_replica_lag_seconds", "Age of the oldest log record not yet acknowledged (primary) or not yet replayed (backup); 0 when none.", nil, nil)
	mHoldSeconds = prometheus.NewDesc("ftkvm_replica_output_hold_seconds", "How long each performed output was held: from the guest's write to its performance (primary; a promoted backup from its replay).", nil, nil)
	mLinkBytes   = prometheus.NewDesc("ftkvm_replica_link_bytes_total", "Bytes this replica wrote to its links.", nil, nil)
	mHeld        = prometheus.NewDesc("ftkvm_replica_held_outputs", "Outputs the primary holds until the backup acknowledges them.", nil, nil)
	mOutputs     = prometheus.NewDesc("ftkvm_replica_outputs_total", "Outputs the guest produced.", nil, nil)
	mPerformed   = prometheus.NewDesc("ftkvm_replica_outputs_performed_total", "Outputs performed (primary), or confirmed by the primary (backup).", nil, nil)
	mDivergences = prometheus.NewDesc("ftkvm_replica_divergences_total", "Divergences found (verify mode, or a log that did not match).", nil, nil)
	mRepairs     = prometheus.NewDesc("ftkvm_replica_repairs_total", "Divergences repaired from the primary's state (backup).", nil, nil)
	mPageRepairs = prometheus.NewDesc("ftkvm_replica_page_repairs_total", "Repairs that carried only the pages that differed, not the full state (backup).", nil, nil)
	mRepairBytes = prometheus.NewDesc("ftkvm_replica_repair_bytes_total", "Bytes of the states repairs installed (backup).", nil, nil)
	mRepairPages = prometheus.NewDesc("ftkvm_replica_repaired_pages_total", "Pages of guest memory repairs changed: those that differed from the primary's (backup).", nil, nil)
	mClaimsOut   = prometheus.NewDesc("ftkvm_replica_claims_total", "Claims this replica made to its witness or arbiter after losing its peer, by outcome: won (it went on), lost (fenced), failed (no answer; asked again).", []string{"outcome"}, nil)
	mPromotions  = prometheus.NewDesc("ftkvm_replica_failovers_total", "Times this replica took over as the primary.", nil, nil)
	mNetRx       = prometheus.NewDesc("ftkvm_replica_net_frames_received_total", "Frames read from the network interfaces' taps and given to the protocol (all interfaces).", nil, nil)
	mNetTx       = prometheus.NewDesc("ftkvm_replica_net_frames_sent_total", "Frames the guest sent that were written to the taps after their release (all interfaces).", nil, nil)
	mNetDropped  = prometheus.NewDesc("ftkvm_replica_net_frames_dropped_total", "Frames dropped, by reason: bad_length (read from a tap, outside 14-1518 bytes), epoch_full (more than 64 waiting for an epoch end), send_error (a tap refused it, or its interface is not attached).", []string{"reason"}, nil)
	mNetAnnounce = prometheus.NewDesc("ftkvm_replica_net_announcements_total", "RARP announcements of the guest's MACs sent after a takeover.", nil, nil)
)

func (c machineCollector) Describe(ch chan<- *prometheus.Desc) { prometheus.DescribeByCollect(c, ch) }

func (c machineCollector) Collect(ch chan<- prometheus.Metric) {
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	b := func(v bool) float64 {
		if v {
			return 1
		}
		return 0
	}
	type snap struct {
		stats vmm.Stats
		now   int64
		prof  vmm.ExitProfile
		dev   []vmm.DeviceUnhandled
	}
	got := make(chan snap, 1)
	done := make(chan error, 1)
	go func() {
		done <- c.m.Do(func(m *vmm.Machine) error {
			got <- snap{m.Stats, m.VirtualTime(), m.ExitProfile(), m.UnhandledAccesses()}
			return nil
		})
	}()
	var err error
	select {
	case err = <-done:
	case <-time.After(time.Second):
		err = errors.New("busy")
	}
	gauge(mUp, b(!errors.Is(err, vmm.ErrNotRunning)))
	select {
	case s := <-got:
		gauge(mStale, 0)
		for _, r := range s.prof.Reasons {
			counter(mExits, float64(r.Exits), r.Reason)
			counter(mExitSeconds, float64(r.HandleNs)/1e9, r.Reason)
		}
		counter(mInjected, float64(s.stats.Injected))
		counter(mTicks, float64(s.stats.TimerEvents))
		counter(mConsole, float64(s.stats.ConsoleBytes))
		gauge(mVirtual, float64(s.now)/1e9)
		for _, d := range s.dev {
			counter(mUnhandled, float64(d.Unhandled), d.Device)
		}
	default:
		gauge(mStale, 1)
	}
	if c.r == nil {
		return
	}
	rm := c.r.Metrics()
	st := rm.Status
	for _, role := range []ft.Role{ft.RolePrimary, ft.RoleBackup} {
		gauge(mRole, b(st.Role == role), role.String())
	}
	gauge(mProtected, b(st.Protected))
	gauge(mLink, b(st.Link))
	gauge(mDiverged, b(st.Diverged))
	gauge(mClaiming, b(st.Claiming))
	gauge(mFenced, b(st.Fenced))
	counter(mEpochs, float64(st.Epochs))
	counter(mCkptEpochs, float64(st.CheckpointEpochs))
	counter(mCkptBytes, float64(st.CheckpointBytes))
	counter(mLogSent, float64(st.LogSent))
	counter(mLogAcked, float64(st.LogAcked))
	gauge(mLag, float64(rm.Lag.Records))
	gauge(mLagBytes, float64(rm.Lag.Bytes))
	gauge(mLagSeconds, rm.Lag.Age.Seconds())
	buckets := make(map[float64]uint64, len(driver.HoldBuckets))
	for i, b := range driver.HoldBuckets {
		buckets[b] = rm.Holds.Counts[i]
	}
	ch <- prometheus.MustNewConstHistogram(mHoldSeconds, rm.Holds.Count, rm.Holds.Sum, buckets)
	counter(mLinkBytes, float64(c.r.LinkBytes()))
	gauge(mHeld, float64(st.Held))
	counter(mOutputs, float64(st.Outputs))
	counter(mPerformed, float64(st.Performed))
	counter(mDivergences, float64(st.Divergences))
	counter(mRepairs, float64(st.Repairs))
	counter(mPageRepairs, float64(st.PageRepairs))
	counter(mRepairBytes, float64(st.RepairBytes))
	counter(mRepairPages, float64(c.r.Profile().RepairedPages))
	counter(mPromotions, float64(st.Promotions))
	ns := c.r.NetStats()
	counter(mNetRx, float64(ns.RxFrames))
	counter(mNetTx, float64(ns.TxFrames))
	counter(mNetDropped, float64(ns.RxBad), "bad_length")
	counter(mNetDropped, float64(st.FramesDropped), "epoch_full")
	counter(mNetDropped, float64(ns.TxErrors), "send_error")
	counter(mNetAnnounce, float64(ns.Announced))
	cl := c.r.Claims()
	counter(mClaimsOut, float64(cl.Won), "won")
	counter(mClaimsOut, float64(cl.Lost), "lost")
	counter(mClaimsOut, float64(cl.Failed), "failed")
}

// witnessCollector reads a witness's counters.
type witnessCollector struct{ s *witness.Server }

var (
	mClaims  = prometheus.NewDesc("ftkvm_witness_claims_total", "Claims the witness answered.", nil, nil)
	mDecided = prometheus.NewDesc("ftkvm_witness_pairs_decided_total", "Pairs the witness decided (first claims).", nil, nil)
	mFailed  = prometheus.NewDesc("ftkvm_witness_claims_failed_total", "Claims that failed (the state file could not be written).", nil, nil)
)

func (c witnessCollector) Describe(ch chan<- *prometheus.Desc) { prometheus.DescribeByCollect(c, ch) }

func (c witnessCollector) Collect(ch chan<- prometheus.Metric) {
	claims, decided, failed := c.s.Counts()
	ch <- prometheus.MustNewConstMetric(mClaims, prometheus.CounterValue, float64(claims))
	ch <- prometheus.MustNewConstMetric(mDecided, prometheus.CounterValue, float64(decided))
	ch <- prometheus.MustNewConstMetric(mFailed, prometheus.CounterValue, float64(failed))
}

// serveMetrics serves c's metrics (and Go's process metrics) on addr at
// /metrics until the process exits. An empty addr serves nothing.
func serveMetrics(addr string, c prometheus.Collector) error {
	if addr == "" {
		return nil
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(c, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("--metrics: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(l)
	fmt.Fprintf(os.Stderr, "ftkvm: metrics on http://%s/metrics\n", l.Addr())
	return nil
}
